"""GRPO groups from the runs of one step.

A group is every run's call at the same slot: (example, predictor, invocation index). Each
sample's reward is its run's reward; the trainer turns rewards into advantages.

Departures from DSPy's GRPO / Arbor:
1. `ragged` works: a group holds the runs that made that call, whatever their number
   (Arbor raises IndexError).
2. Nothing is padded by repeating a group's members to reach G, and every group of the
   step is sent to the trainer (Arbor trains one group per optimizer step and drops the rest).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

from espalier.types import Group, LMCall, Rollout, Sample

GroupingMode = Literal["truncate", "fill", "ragged"]
FillStrategy = Literal["randint", "max"] | None


def build_groups(
    rollouts: Sequence[Rollout],
    predictors: Sequence[str],
    mode: GroupingMode = "truncate",
    fill_strategy: FillStrategy = None,
    rng: random.Random | None = None,
) -> list[Group]:
    """Groups for every (example, predictor, invocation) slot, in a stable order."""
    rng = rng or random.Random(0)
    by_example: dict[int, list[Rollout]] = {}
    for r in rollouts:
        by_example.setdefault(r.example_index, []).append(r)
    groups = []
    for example_index, runs in sorted(by_example.items()):
        for predictor in predictors:
            per_run = [(run, [c for c in run.calls if c.predictor == predictor and c.completion_ids]) for run in runs]
            for invocation, members in enumerate(_slots(per_run, mode, fill_strategy, rng)):
                if members:
                    key = f"ex{example_index}/{predictor}/{invocation}"
                    groups.append(Group(samples=tuple(_sample(call, run) for run, call in members), key=key))
    return groups


def _slots(per_run, mode: GroupingMode, fill_strategy: FillStrategy, rng: random.Random):
    counts = [len(calls) for _, calls in per_run]
    if not counts or max(counts) == 0:
        return []
    if mode == "truncate":
        return [[(run, calls[i]) for run, calls in per_run] for i in range(min(counts))]
    if mode == "ragged":
        return [[(run, calls[i]) for run, calls in per_run if i < len(calls)] for i in range(max(counts))]
    if mode == "fill":
        return [[(run, _filled(calls, i, fill_strategy, rng)) for run, calls in per_run if calls] for i in range(max(counts))]
    raise ValueError(f"variably_invoked_predictor_grouping_mode must be truncate, fill or ragged, not {mode!r}")


def _filled(calls: list[LMCall], i: int, strategy: FillStrategy, rng: random.Random) -> LMCall:
    """The run's call at slot i, or a stand-in from the same run when it made fewer calls."""
    if i < len(calls):
        return calls[i]
    if strategy == "max":
        return calls[-1]
    return calls[rng.randrange(len(calls))]


def _sample(call: LMCall, run: Rollout) -> Sample:
    return Sample(
        prompt_ids=call.prompt_ids,
        completion_ids=call.completion_ids,
        reward=run.reward,
        logprobs=call.logprobs,
        truncated=call.truncated,
    )
