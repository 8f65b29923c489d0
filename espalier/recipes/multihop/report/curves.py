"""The report's numbers: typed points taken from `ArborGRPO.history`, and their JSON form.

A step record gives the train reward (mean and spread), the share of groups that trained
(groups whose rewards varied: a group with one reward has zero advantage everywhere) and the
step's time split; a validation record gives recall, format failures and its own time. Wall
time is seconds since the run started, from each record's `timestamp`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class StepPoint:
    step: int
    wall_s: float
    reward_mean: float
    reward_std: float
    trained_share: float  # groups whose rewards varied, so that they had an advantage to train on
    format_failure_rate: float  # of the step's rollouts (sampled at the rollout temperature)
    rollouts_s: float
    train_s: float


@dataclass(frozen=True)
class ValPoint:
    step: int
    wall_s: float
    recall: float
    format_failure_rate: float
    error_rate: float
    time_s: float
    num_examples: int


@dataclass(frozen=True)
class Curves:
    steps: list[StepPoint] = field(default_factory=list)
    validation: list[ValPoint] = field(default_factory=list)
    first_search_recall: float | None = None  # dev recall of the claim's own search: the always-parsing floor

    @classmethod
    def from_history(cls, history: Sequence[dict[str, Any]], start: float, first_search_recall: float | None = None
                     ) -> Curves:
        """`start`: the run's start (time.time()); records without a timestamp get wall time 0."""

        def wall(h: dict[str, Any]) -> float:
            return max(float(h.get("timestamp", start)) - start, 0.0)

        steps = [
            StepPoint(
                step=int(h["step"]),
                wall_s=wall(h),
                reward_mean=float(h["reward/mean"]),
                reward_std=float(h["reward/std"]),
                trained_share=1.0 - float(h.get("groups/no_variance_share", 1.0)),
                format_failure_rate=float(h.get("rollouts/format_failure_rate", 0.0)),
                rollouts_s=float(h.get("time/rollouts_s", 0.0)),
                train_s=float(h.get("time/train_s", 0.0)),
            )
            for h in history
            if h.get("kind") == "step"
        ]
        vals = [
            ValPoint(
                step=int(h["step"]),
                wall_s=wall(h),
                recall=float(h["score"]),
                format_failure_rate=float(h["format_failure_rate"]),
                error_rate=float(h.get("error_rate", 0.0)),
                time_s=float(h.get("time_s", 0.0)),
                num_examples=int(h.get("num_examples", 0)),
            )
            for h in history
            if h.get("kind") == "val"
        ]
        return cls(steps, vals, first_search_recall)

    def best(self) -> ValPoint | None:
        """The first validation with the highest recall (as `single-best` keeps it)."""
        return max(self.validation, key=lambda v: v.recall) if self.validation else None

    def to_dict(self) -> dict[str, Any]:
        return {"steps": [asdict(p) for p in self.steps], "validation": [asdict(v) for v in self.validation],
                "first_search_recall": self.first_search_recall}
