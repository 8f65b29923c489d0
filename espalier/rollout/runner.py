"""Running a DSPy program many times in threads: rollouts for training, and evaluation.

`rollout_program` makes the copy of the user's program that rollouts use: each predictor's LM
replaced by a `CapturingLM` (sampling settings of the step, log-probs requested), demos kept
or dropped per `exclude_demos`. `run_rollouts` runs G copies per example, `num_threads` at a
time, each under its own Recorder. `evaluate` runs the program once per example.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import dspy
from tqdm.auto import tqdm

from espalier.program.capture import CapturingLM, recording
from espalier.rollout.rewards import Metric, Scored, score_run
from espalier.types import Rollout


def rollout_program(student: dspy.Module, exclude_demos: bool, lm_overrides: dict[str, Any]) -> dspy.Module:
    """A copy of `student` whose predictors report their LM calls with token ids."""
    program = student.deepcopy()
    for name, predictor in program.named_predictors():
        if predictor.lm is None:
            raise ValueError(f"predictor {name!r} has no LM: call program.set_lm(lm) with an Espalier LM first")
        predictor.lm = CapturingLM.wrap(predictor.lm, name, **lm_overrides)
        if exclude_demos:
            predictor.demos = []
    return program


def run_rollouts(
    programs: Sequence[dspy.Module],
    examples: Sequence[tuple[int, dspy.Example]],
    num_rollouts: int,
    metric: Metric,
    failure_score: float,
    format_failure_score: float,
    num_threads: int,
    adapter: dspy.Adapter | None = None,
    desc: str = "rollouts",
) -> list[Rollout]:
    """`num_rollouts` runs per example; run j uses programs[j % len(programs)] (student first, then teachers)."""
    jobs = [(index, ex, programs[j % len(programs)]) for index, ex in examples for j in range(num_rollouts)]

    def one(job: tuple[int, dspy.Example, dspy.Module]) -> Rollout:
        index, example, program = job
        with dspy.context(adapter=adapter) if adapter else nullcontext(), recording() as recorder:
            scored = score_run(program, example, metric, failure_score, format_failure_score)
        return Rollout(example_index=index, calls=tuple(recorder.calls), reward=scored.reward, failure=scored.failure,
                       fallback_calls=len(recorder.fallbacks))

    return map_threads(one, jobs, num_threads, desc)


@dataclass(frozen=True)
class EvalResult:
    score: float  # mean metric, failed runs counted as 0, in [0, 1] for a [0, 1] metric
    format_failure_rate: float
    error_rate: float
    num_examples: int

    @classmethod
    def of(cls, results: Sequence[Scored]) -> EvalResult:
        n = max(len(results), 1)
        return cls(
            score=sum(r.reward for r in results) / n,
            format_failure_rate=sum(r.format_failure for r in results) / n,
            error_rate=sum(r.failure is not None and not r.format_failure for r in results) / n,
            num_examples=len(results),
        )

    def to_dict(self) -> dict[str, float]:
        return {
            "score": self.score,
            "format_failure_rate": self.format_failure_rate,
            "error_rate": self.error_rate,
            "num_examples": self.num_examples,
        }


def evaluate(
    program: dspy.Module,
    dataset: Sequence[dspy.Example],
    metric: Metric,
    num_threads: int,
    adapter: dspy.Adapter | None = None,
    desc: str = "validation",
) -> EvalResult:
    """Score the program once per example; a failed run scores 0 and is counted by kind."""

    def one(example: dspy.Example) -> Scored:
        with dspy.context(adapter=adapter) if adapter else nullcontext():
            return score_run(program, example, metric, failure_score=0.0, format_failure_score=0.0)

    return EvalResult.of(map_threads(one, list(dataset), num_threads, desc))


def map_threads(fn: Callable, items: list, num_threads: int, desc: str) -> list:
    """Ordered thread map with a progress bar (tqdm shows rate and time left).

    Each task runs in a copy of the caller's context, so `dspy.context(...)` set around
    `compile` (adapter, callbacks) holds inside the worker threads too.
    """
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(num_threads, len(items)))) as pool:
        bar = tqdm(total=len(items), desc=desc, unit="run", leave=False, dynamic_ncols=True)
        futures = [pool.submit(contextvars.copy_context().run, fn, item) for item in items]
        results = []
        for f in futures:
            results.append(f.result())
            bar.update(1)
        bar.close()
    return results
