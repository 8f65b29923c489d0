"""The table writer: sections to Markdown (`BENCHMARKS.md`) and to JSON (`benchmarks/results/<date>-<machine>.json`)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.common import Section, Table, describe


def markdown_table(table: Table, device: str = "") -> str:
    """One table; `device` ("CPU", "GPU") prefixes the title so no figure is read as another device's."""
    if any(len(row) != len(table.columns) for row in table.rows):
        raise ValueError(f"table {table.title!r}: every row needs {len(table.columns)} cells")
    lines = [f"### {f'[{device}] ' if device else ''}{table.title}", "", "| " + " | ".join(table.columns) + " |",
             "| " + " | ".join(["---"] + ["---:"] * (len(table.columns) - 1)) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table.rows]
    lines += [""] + [f"- {note}" for note in table.notes]
    return "\n".join(lines).rstrip() + "\n"


def markdown(sections: list[Section], machine: dict[str, Any], mode: str, command: str, when: str) -> str:
    head = [
        "# Espalier benchmarks",
        "",
        f"Measured {when} with `{command}` ({mode} mode). Every figure is on **{machine['device']}** "
        f"(no accelerator was used unless one is named here), and every ratio compares figures measured "
        "in this same run, each the median of several repetitions.",
        "",
        f"Machine: {describe(machine)}.",
        "",
    ]
    body = []
    for section in sections:
        body += [f"## {section.name} ({machine['device']}, {section.seconds:.0f} s)", ""]
        body += [f"_Limits: {section.limits}_", ""] if section.limits else []
        body += [markdown_table(t, machine["device"]) for t in section.tables]
    return "\n".join(head + body)


def _clean(value: Any) -> Any:
    """JSON without NaN/inf (they become null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def as_json(sections: list[Section], machine: dict[str, Any], mode: str, when: str) -> str:
    record = {"when": when, "mode": mode, "machine": machine, "sections": {s.name: asdict(s) for s in sections}}
    return json.dumps(_clean(record), indent=2, default=str)


def machine_name(machine: dict[str, Any]) -> str:
    """'<host>-cpu2' or '<host>-gpu-<name>': the <machine> of the JSON file name."""
    kind = f"{machine['device'].lower()}{machine['cores']}"
    if machine["device"] != "CPU":
        kind = f"gpu-{machine['accelerator']}"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in f"{machine['host'] or 'machine'}-{kind}")


def write(sections: list[Section], machine: dict[str, Any], mode: str, command: str, markdown_path: Path,
          results_dir: Path) -> tuple[Path, Path]:
    """Write BENCHMARKS.md and the JSON record; returns both paths."""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    markdown_path.write_text(markdown(sections, machine, mode, command, when))
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / f"{time.strftime('%Y-%m-%d', time.gmtime())}-{machine_name(machine)}.json"
    if json_path.exists():  # a second run the same day keeps the first
        json_path = json_path.with_name(f"{json_path.stem}-{time.strftime('%H%M', time.gmtime())}.json")
    json_path.write_text(as_json(sections, machine, mode, when))
    return markdown_path, json_path
