"""`ArborGRPO.history`: one typed record per GRPO step and per validation, in the order they ran.

    steps(compiler.history)[-1].metrics["reward/mean"]     # the last step's mean reward
    validations(compiler.history)[0].result.score          # the validation before training

A `StepRecord` carries the step's metrics as the tracker logs them (`rollout/report.py`
names them: `reward/mean`, `time/rollouts_s`, `train/loss`, ...); a `ValRecord` carries the
validation's `EvalResult`. `to_dict` / `record_from_dict` are their JSON form, in which
`compile_state.json` keeps them for a resumed run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from espalier.rollout.runner import EvalResult


@dataclass(frozen=True)
class StepRecord:
    step: int  # 1-based: the GRPO step this record closes
    timestamp: float  # time.time() when the step ended
    metrics: dict[str, float]

    @property
    def seconds(self) -> float:
        """Rollouts and training: the step's wall time without validation."""
        return self.metrics["time/rollouts_s"] + self.metrics["time/train_s"]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "step", "step": self.step, "timestamp": self.timestamp, **self.metrics}


@dataclass(frozen=True)
class ValRecord:
    step: int  # the GRPO steps trained before it (0: the untrained program)
    timestamp: float
    time_s: float  # how long the validation took
    result: EvalResult

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "val", "step": self.step, "timestamp": self.timestamp, "time_s": self.time_s,
                **self.result.to_dict()}


Record = StepRecord | ValRecord
_HEAD = ("kind", "step", "timestamp", "time_s")


def record_from_dict(data: dict[str, Any]) -> Record:
    if data["kind"] == "step":
        metrics = {k: v for k, v in data.items() if k not in _HEAD}
        return StepRecord(int(data["step"]), float(data.get("timestamp", 0.0)), metrics)
    if data["kind"] == "val":
        result = EvalResult(data["score"], data["format_failure_rate"], data["error_rate"], data["num_examples"])
        return ValRecord(int(data["step"]), float(data.get("timestamp", 0.0)), float(data.get("time_s", 0.0)), result)
    raise ValueError(f"a history record is a step or a validation, not {data['kind']!r}")


def steps(history: Sequence[Record]) -> list[StepRecord]:
    return [r for r in history if isinstance(r, StepRecord)]


def validations(history: Sequence[Record]) -> list[ValRecord]:
    return [r for r in history if isinstance(r, ValRecord)]
