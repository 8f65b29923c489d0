"""The compiler's side of a resumable run: what `ArborGRPO.compile` saves after every step and validation.

`run_dir/compile_state.json` holds the GRPO job's id, the steps done, the random state that
draws and groups examples, the trainset cursor, the history and the best checkpoint so far.
The server keeps the trainer's side (job_store.py). `compile(..., resume=True)` reads both
and does exactly the steps that were left, on the examples an uninterrupted run would draw.

Written atomically (temp file, fsync, rename), so a kill -9 at any moment leaves the state of
the last finished step or validation.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "compile_state.json"
VERSION = 1


@dataclass
class CompileState:
    job_id: str
    steps_done: int
    server_steps: int  # steps the server trained (fewer when a step had no group): the state to resume
    last_validated: int
    failed_steps: int
    best_score: float | None  # None: no validation yet
    best_step: int
    best_name: str | None
    rng: list[Any]  # random.Random.getstate(), as JSON
    order: list[int]  # the epoch's shuffled trainset indices, and the next one to draw
    cursor: int
    history: list[dict[str, Any]] = field(default_factory=list)
    fill_rng: list[Any] = field(default_factory=list)  # the grouping's random fill (random.Random.getstate())
    version: int = VERSION

    def write(self, run_dir: Path) -> None:
        write_json_atomically(Path(run_dir) / STATE_FILE, asdict(self))

    @staticmethod
    def read(run_dir: Path) -> CompileState | None:
        path = Path(run_dir) / STATE_FILE
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        if data.get("version") != VERSION:
            raise ValueError(f"{path} was written by another version of Espalier (version {data.get('version')}); "
                             "start a new run directory")
        return CompileState(**data)


def write_json_atomically(path: Path, data: Any) -> None:
    """Write JSON to a hidden temp file beside `path`, fsync it, rename it over `path`: a reader (or a process
    killed mid-write) sees the old file or the new one, never half of one. Used by both sides of a resumable
    run (this compiler state and the server's `job_store.py`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state(rng: random.Random) -> list[Any]:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_rng_state(rng: random.Random, state: list[Any]) -> None:
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))
