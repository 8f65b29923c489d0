"""What the trainer fed, for audits and tests: a callback of `GRPOTrainer` and a JSONL recorder.

`GRPOTrainer(on_fed=...)` calls `on_fed(rows)` with one row per sequence of each micro-batch it
feeds, read back from the tensors (`batch.fed_rows`: prompt ids, loss-bearing completion ids,
advantage), plus `optimizer_step` and `computed` (False for the zero-gradient sequences it skips).
`SequenceRecorder` appends those rows to one JSONL file per GRPO step of the job:
`<directory>/step-00001.jsonl` on rank 0, `<directory>/step-00001.rank<r>.jsonl` on rank r > 0
(each rank feeds its own share of every optimizer batch).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

OnFed = Callable[[list[dict[str, Any]]], None]


def record_file(directory: Path, step: int, rank: int = 0) -> Path:
    """The file of the job's step `step` (1-based) on rank `rank`."""
    suffix = f".rank{rank}" if rank else ""
    return directory / f"step-{step:05d}{suffix}.jsonl"


class SequenceRecorder:
    """An `OnFed` callback that appends the rows to the file of the step being trained (`start_step`)."""

    def __init__(self, directory: Path, rank: int = 0) -> None:
        self.directory = Path(directory)
        self.rank = rank
        self.path: Path | None = None

    def start_step(self, step: int) -> None:
        """The rows fed from now on belong to the job's step `step`."""
        self.path = record_file(self.directory, step, self.rank)

    def __call__(self, rows: list[dict[str, Any]]) -> None:
        if self.path is None:
            raise RuntimeError("SequenceRecorder got rows before start_step")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
