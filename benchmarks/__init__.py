"""Side-by-side benchmarks of Espalier against what a user would otherwise pick (`espalier bench`).

Run from the repository root: `espalier bench --quick` or `python -m benchmarks.run_all --quick`.
"""
