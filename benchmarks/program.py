"""The benchmarked DSPy program: `ResearchHop` over BM25 on the synthetic world, on an Espalier server.

It runs exactly as `espalier run multihop` runs it: the adapter (`make_adapter(RunOptions().adapter)`)
and the sampling settings (`train_kwargs_for(RunOptions())`) are read from the job's defaults,
never copied. `make_lm` builds the recipe's LM (cache off, so repeated runs really generate);
`make_program` the program; `rollouts` runs a step's worth of it (k examples x G runs) the way
`ArborGRPO` does, through `rollout_program` + `run_rollouts`.

Departure from the job: `JitteredMetric` (the ArborGRPO step section's metric) adds a small
deterministic jitter to every score, so every group has reward variance and trains.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Any

import dspy

from espalier.grpo_config import SAMPLING_KEYS
from espalier.program.provider import ArborProvider
from espalier.recipes.multihop import ResearchHop, recall
from espalier.recipes.multihop.job import RunOptions, make_adapter, train_kwargs_for
from espalier.rollout.runner import rollout_program, run_rollouts
from espalier.types import Rollout

JOB = RunOptions()  # `espalier run multihop`'s defaults
SAMPLING = {key: train_kwargs_for(JOB)[key] for key in SAMPLING_KEYS}  # the job's rollout sampling settings
JITTER = 1e-3  # JitteredMetric's scores lie in [score, score + JITTER)


def job_adapter() -> dspy.Adapter:
    """A fresh instance of the job's adapter (`RunOptions().adapter`)."""
    return make_adapter(JOB.adapter)


def adapter_name() -> str:
    return type(job_adapter()).__name__


class JitteredMetric:
    """`metric` plus a jitter in [0, JITTER) from a seeded RNG: every group gets reward variance.

    The trainer skips zero-advantage sequences, so a step whose groups all score alike trains
    nothing; with the jitter every sequence trains (the worst case for training time). Draws
    are a fixed sequence (seed), handed out in call order under a lock (rollouts run in threads)."""

    def __init__(self, metric: Callable[..., float] = recall, seed: int = 0) -> None:
        self.metric = metric
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def __call__(self, example: Any, pred: Any, trace: Any = None) -> float:
        score = float(self.metric(example, pred, trace))
        with self._lock:
            return score + JITTER * self._rng.random()

    def __deepcopy__(self, memo: dict) -> JitteredMetric:  # one RNG however often it is copied
        return self


def make_lm(server: dict[str, Any], max_tokens: int, provider: dspy.Provider | None = None) -> dspy.LM:
    return dspy.LM(
        model=f"openai/arbor:{server['model']}",
        provider=provider or ArborProvider(),
        api_base=server["base_url"],
        api_key=server.get("api_key") or "local",
        max_tokens=max_tokens,
        num_retries=0,
        cache=False,
        **SAMPLING,
    )


def make_program(bench, lm: dspy.LM) -> ResearchHop:
    program = ResearchHop(num_docs=bench.sizes.num_docs, num_hops=bench.sizes.num_hops, search=bench.search)
    program.set_lm(lm)
    return program


def rollouts(bench, server: dict[str, Any], k: int, G: int, max_tokens: int, offset: int = 0,
             adapter: dspy.Adapter | None = None) -> list[Rollout]:
    """One step's rollouts: k training claims (from `offset`) x G runs, `threads` in flight, the job's adapter
    (or `adapter`)."""
    program = rollout_program(make_program(bench, make_lm(server, max_tokens)), True, {**SAMPLING, "logprobs": True})
    examples = [(i, bench.data.train[i % len(bench.data.train)]) for i in range(offset, offset + k)]
    return run_rollouts([program], examples, G, recall, 0.0, -1.0, bench.sizes.threads, adapter or job_adapter(),
                        desc="bench rollouts")


def generated_tokens(runs: list[Rollout]) -> int:
    return sum(len(c.completion_ids) for r in runs for c in r.calls)


def prompt_waves(runs: list[Rollout]) -> list[list[list[int]]]:
    """The prompts of the runs' LM calls, by position in the run: wave i holds every run's i-th call.

    Calls of one run depend on each other, calls at the same position do not, so this is how a
    user without a server would batch the same work through `generate`."""
    waves: list[list[list[int]]] = []
    for r in runs:
        for i, call in enumerate(r.calls):
            if i == len(waves):
                waves.append([])
            waves[i].append(list(call.prompt_ids))
    return waves
