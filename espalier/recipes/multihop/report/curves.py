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

from espalier.history import Record, StepRecord, ValRecord, steps, validations


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
    def from_history(cls, history: Sequence[Record], start: float, first_search_recall: float | None = None
                     ) -> Curves:
        """`start`: the run's start (time.time()); a record's wall time is its timestamp after it."""
        return cls([_step_point(r, start) for r in steps(history)],
                   [_val_point(r, start) for r in validations(history)], first_search_recall)

    def best(self) -> ValPoint | None:
        """The first validation with the highest recall (as `single-best` keeps it)."""
        return max(self.validation, key=lambda v: v.recall) if self.validation else None

    def to_dict(self) -> dict[str, Any]:
        return {"steps": [asdict(p) for p in self.steps], "validation": [asdict(v) for v in self.validation],
                "first_search_recall": self.first_search_recall}


def _step_point(record: StepRecord, start: float) -> StepPoint:
    m = record.metrics
    return StepPoint(
        step=record.step, wall_s=max(record.timestamp - start, 0.0), reward_mean=m["reward/mean"],
        reward_std=m["reward/std"], trained_share=1.0 - m.get("groups/no_variance_share", 1.0),
        format_failure_rate=m.get("rollouts/format_failure_rate", 0.0), rollouts_s=m.get("time/rollouts_s", 0.0),
        train_s=m.get("time/train_s", 0.0),
    )


def _val_point(record: ValRecord, start: float) -> ValPoint:
    r = record.result
    return ValPoint(step=record.step, wall_s=max(record.timestamp - start, 0.0), recall=r.score,
                    format_failure_rate=r.format_failure_rate, error_rate=r.error_rate, time_s=record.time_s,
                    num_examples=r.num_examples)
