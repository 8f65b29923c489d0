"""The table writer: sections to Markdown (`BENCHMARKS.md`) and to JSON (`benchmarks/results/<date>-<machine>.json`)."""

from __future__ import annotations

import json
import math
import re
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


def merge(page: str, old: str) -> str:
    """This run's `page`, then the sections of the `old` page that it did not measure, in their order, each
    still saying when and on what it was measured (the old page's header, unless the section says it itself)."""
    head, parts = split_sections(page)
    old_head, old_parts = split_sections(old)
    lines = old_head.splitlines()
    origin = " ".join(line.split(". Every figure")[0].rstrip(".") for line in lines if line.startswith("Measured "))
    machine = " ".join(line.removeprefix("Machine: ").rstrip(".") for line in lines if line.startswith("Machine: "))
    measured = {name for name, _ in parts}
    kept = []
    for name, text in old_parts:
        if name in measured:
            continue
        heading, _, rest = text.partition("\n")
        if origin and "\n_Measured" not in rest:  # a section measured apart says so itself
            rest = f"\n_{origin}, on {machine or 'the machine of that run'} (an earlier run)._\n{rest}"
        kept.append(f"{heading}\n{rest}")
    return head + "\n".join(text.rstrip("\n") + "\n" for text in [*(t for _, t in parts), *kept])


def split_sections(page: str) -> tuple[str, list[tuple[str, str]]]:
    """(text before the first `## ` heading, [(section name, its text with the heading)])."""
    head, *sections = re.split(r"(?m)^(?=## )", page)
    return head, [(text[3:].partition("\n")[0].split(" (")[0].strip(), text) for text in sections]


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
    """Write BENCHMARKS.md (keeping the sections this run did not measure) and the JSON record; returns both paths."""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    page = markdown(sections, machine, mode, command, when)
    markdown_path.write_text(merge(page, markdown_path.read_text()) if markdown_path.exists() else page)
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / f"{time.strftime('%Y-%m-%d', time.gmtime())}-{machine_name(machine)}.json"
    if json_path.exists():  # a second run the same day keeps the first
        json_path = json_path.with_name(f"{json_path.stem}-{time.strftime('%H%M', time.gmtime())}.json")
    json_path.write_text(as_json(sections, machine, mode, when))
    return markdown_path, json_path
