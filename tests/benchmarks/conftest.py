"""benchmarks/ is a folder of the checkout, not of the installed package: make it importable under plain `pytest`."""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
