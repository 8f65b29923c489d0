"""`python -m espalier ...` is `espalier ...` (the console script), for environments without it on PATH."""

import sys

from espalier.cli import main

if __name__ == "__main__":
    sys.exit(main())
