"""The run report: `report.html` (self-contained), its PNG plots and `report.json` (the numbers).

`write_report(run_dir, page)` writes all three from typed records; `LiveReport` (live.py)
refreshes them from `ArborGRPO.history` at every validation of `espalier run multihop`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

from espalier.recipes.multihop.report.curves import Curves, StepPoint, ValPoint
from espalier.recipes.multihop.report.page import ReportPage, render
from espalier.recipes.multihop.report.plots import write_plots

__all__ = ["Curves", "ReportPage", "StepPoint", "ValPoint", "write_report"]


def write_report(run_dir: Path, page: ReportPage) -> Path:
    """plots/*.png, report.json and report.html in `run_dir`; returns the page's path."""
    run_dir = Path(run_dir)
    page = replace(page, plots=write_plots(page.curves, run_dir / "plots"))
    data = {
        "run_dir": page.run_dir, "model": page.model, "adapter": page.adapter, "data": page.data,
        "total_steps": page.total_steps, "finished": page.finished, **page.curves.to_dict(),
        "examples": {"before": [asdict(r) for r in page.before], "after": [asdict(r) for r in page.after],
                     "after_label": page.after_label},
    }  # fmt: skip
    _atomic_write(run_dir / "report.json", json.dumps(data, indent=2))
    path = run_dir / "report.html"
    _atomic_write(path, render(page))
    return path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)  # a browser reloading mid-run never reads half a page
