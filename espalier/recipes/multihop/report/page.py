"""The report page: one self-contained HTML file (plots embedded as base64 PNG, no network)."""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from espalier.recipes.multihop.metric import normalize_title
from espalier.recipes.multihop.report.curves import Curves, ValPoint
from espalier.recipes.multihop.scoring import ExampleResult

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1150px; color: #1a202c; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.8em; }
.meta { color: #4a5568; font-size: 0.9em; }
.cards { display: flex; gap: 1em; flex-wrap: wrap; margin: 1.2em 0; }
.card { border: 1px solid #e2e8f0; border-radius: 8px; padding: 0.7em 1.1em; flex: 1 1 auto; }
.card .v { font-size: 1.5em; font-weight: 600; white-space: nowrap; } .card .k { color: #4a5568; font-size: 0.85em; }
img { max-width: 100%; border: 1px solid #edf2f7; border-radius: 6px; margin: 0.4em 0; }
table { border-collapse: collapse; width: 100%; font-size: 0.85em; }
th, td { border: 1px solid #e2e8f0; padding: 0.45em; vertical-align: top; text-align: left; }
th { background: #f7fafc; } .gold { background: #c6f6d5; border-radius: 3px; padding: 0 2px; }
.fail { color: #c05621; } ol { margin: 0; padding-left: 1.3em; } .score { font-weight: 600; }
"""


@dataclass(frozen=True)
class ReportPage:
    run_dir: str
    model: str
    adapter: str
    data: str
    total_steps: int
    curves: Curves
    finished: bool
    plots: dict[str, Path] = field(default_factory=dict)  # name -> PNG file
    before: list[ExampleResult] = field(default_factory=list)  # a few dev examples, base model
    after: list[ExampleResult] = field(default_factory=list)  # the same, best checkpoint (at the end of the run)
    after_label: str = ""


def render(page: ReportPage) -> str:
    state = "finished" if page.finished else "in progress (refreshed at every validation)"
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Espalier run: {escape(Path(page.run_dir).name)}</title><style>{STYLE}</style></head><body>",
        "<h1>Espalier run report</h1>",
        f"<div class='meta'>{escape(page.run_dir)} &middot; model {escape(page.model)} &middot; adapter "
        f"{escape(page.adapter)} &middot; data {escape(page.data)} &middot; {state} &middot; written "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}</div>",
        _cards(page),
        "<h2>Validation</h2>", _img(page, "validation"),
        "<h2>Training</h2>", _img(page, "training"),
        "<h2>Time per step</h2>", _img(page, "time"),
        "<h2>Before and after, on a few dev examples</h2>", _examples(page),
        "<p class='meta'>The numbers behind the curves: <a href='report.json'>report.json</a>; every step's "
        "metrics: <a href='metrics.jsonl'>metrics.jsonl</a>.</p></body></html>",
    ]
    return "\n".join(parts)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _cards(page: ReportPage) -> str:
    c = page.curves
    base, best, last = (c.validation[0] if c.validation else None), c.best(), (c.validation[-1] if c.validation else None)
    wall = max([p.wall_s for p in c.steps] + [v.wall_s for v in c.validation] + [0.0]) / 60
    cards = [
        ("dev recall: baseline → best", f"{_pct(base and base.recall)} → {_pct(best and best.recall)}"),
        ("best at step", str(best.step) if best else "n/a"),
        ("best recall beyond the first search (what the model adds)", _points(best, c.first_search_recall)),
        ("format failures: baseline → latest", f"{_pct(base and base.format_failure_rate)} → "
                                               f"{_pct(last and last.format_failure_rate)}"),
        ("steps", f"{len(c.steps)} / {page.total_steps}"),
        ("wall time", f"{wall:.1f} min"),
    ]
    body = "".join(f"<div class='card'><div class='v'>{escape(v)}</div><div class='k'>{escape(k)}</div></div>"
                   for k, v in cards)
    return f"<div class='cards'>{body}</div>"


def _points(best: ValPoint | None, floor: float | None) -> str:
    return "n/a" if best is None or floor is None else f"{100 * (best.recall - floor):+.1f} points"


def _img(page: ReportPage, name: str) -> str:
    path = page.plots.get(name)
    if path is None or not path.exists():
        return "<p class='meta'>(no data yet)</p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<img alt='{escape(name)} plot' src='data:image/png;base64,{data}'>"


def _examples(page: ReportPage) -> str:
    if not page.before:
        return "<p class='meta'>(after the first validation)</p>"
    after = {r.index: r for r in page.after}
    label = escape(page.after_label or "best checkpoint")
    rows = ["<table><tr><th>claim / question</th><th>gold titles</th><th>baseline (no adapter)</th>"
            f"<th>{label}</th></tr>"]
    for b in page.before:
        a = after.get(b.index)
        cell = _outcome(a) if a else "<span class='meta'>at the end of the run</span>"
        rows.append(f"<tr><td>{escape(b.claim)}</td><td>{'<br>'.join(map(escape, b.gold_titles))}</td>"
                    f"<td>{_outcome(b)}</td><td>{cell}</td></tr>")
    rows.append("</table><p class='meta'>Queries in order (the first is the claim itself); retrieved titles with "
                "gold titles <span class='gold'>highlighted</span>; greedy decoding as in validation.</p>")
    return "\n".join(rows)


def _outcome(r: ExampleResult) -> str:
    gold = {normalize_title(t) for t in r.gold_titles}
    queries = "".join(f"<li>{escape(q[:200]) if q.strip() else '<i>(empty)</i>'}</li>" for q in r.queries)
    titles = ", ".join(f"<span class='gold'>{escape(t)}</span>" if normalize_title(t) in gold else escape(t)
                       for t in r.retrieved_titles)
    failure = f"<div class='fail'>{escape(r.failure[:160])}</div>" if r.failure else ""
    return (f"<div class='score'>recall {100 * r.score:.0f}%</div>{failure}<div>queries:<ol>{queries}</ol></div>"
            f"<div>retrieved: {titles or '(none)'}</div>")
