"""`python -m espalier ...` runs the same command line as the `espalier` console script."""

from __future__ import annotations

import subprocess
import sys


def test_python_dash_m_espalier_is_the_cli(capsys):
    from espalier.cli import main

    done = subprocess.run([sys.executable, "-m", "espalier", "run", "multihop", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    try:
        main(["run", "multihop", "--help"])
    except SystemExit as e:
        assert e.code == 0
    assert done.stdout == capsys.readouterr().out and "--rollouts-per-example" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "espalier", "no-such-command"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
