"""What a GRPO job keeps on disk, under `run_dir`, so that a dead trainer or a killed run can go on.

    run_dir/adapters/<job_id>/step-N/          the adapter published after step N (only the latest is kept)
    run_dir/checkpoints/<job_id>/<name>/       named checkpoints (adapter + trainer state), kept
    run_dir/checkpoints/<job_id>/.state/step-N the trainer's state after step N (the latest two are kept)
    run_dir/checkpoints/<job_id>/.job.json     the checkpoint records, so a resumed job serves them again
    (hidden names cannot clash with checkpoint names, which never start with '.')

Every directory is written atomically (`training/checkpoint.py`) and `.job.json` by an fsync'd
rename, so a crash at any moment leaves either the old or the new copy.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from espalier.resume import write_json_atomically

KEPT_STATES = 2  # the step just trained and the one before: a client that crashed before recording the
# latest step resumes from the one before it


@dataclass(frozen=True)
class JobStore:
    run_dir: Path
    job_id: str

    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints" / self.job_id

    def export_dir(self, step: int) -> Path:
        return self.run_dir / "adapters" / self.job_id / f"step-{step:05d}"

    def state_dir(self, step: int) -> Path:
        return self.checkpoint_root / ".state" / f"step-{step:05d}"

    def saved_steps(self) -> list[int]:
        root = self.checkpoint_root / ".state"
        return sorted(int(p.name.removeprefix("step-")) for p in root.glob("step-*") if p.name[5:].isdigit())

    def after_step(self, step: int) -> None:
        """Drop what step `step` made obsolete: older exported adapters and all but the latest states."""
        for old in self.export_dir(step).parent.glob("step-*"):
            if old.name < self.export_dir(step).name:
                shutil.rmtree(old, ignore_errors=True)
        for old in self.saved_steps()[:-KEPT_STATES]:
            shutil.rmtree(self.state_dir(old), ignore_errors=True)

    def forget_after(self, step: int) -> None:
        """A job resumed at `step` drops the states of steps it will train again, and half-written ones."""
        for later in self.saved_steps():
            if later > step:
                shutil.rmtree(self.state_dir(later), ignore_errors=True)
        for partial in (self.checkpoint_root / ".state").glob(".step-*"):
            shutil.rmtree(partial, ignore_errors=True)

    def write_checkpoints(self, records: dict[str, dict[str, Any]]) -> None:
        write_json_atomically(self.checkpoint_root / ".job.json", {"job_id": self.job_id, "checkpoints": records})

    def read_checkpoints(self) -> dict[str, dict[str, Any]]:
        path = self.checkpoint_root / ".job.json"
        return json.loads(path.read_text())["checkpoints"] if path.exists() else {}
