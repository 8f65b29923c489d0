"""The benchmarked DSPy program: `ResearchHop` over BM25 on the synthetic world, on an Espalier server.

`make_lm` builds the recipe's LM (cache off, so repeated runs really generate);
`make_program` the program; `rollouts` runs a step's worth of it (k examples x G runs) the
way `ArborGRPO` does, through `rollout_program` + `run_rollouts` with `PrefillChatAdapter`.
"""

from __future__ import annotations

from typing import Any

import dspy

from espalier.program.adapter import PrefillChatAdapter
from espalier.program.provider import ArborProvider
from espalier.recipes.multihop import ResearchHop, recall
from espalier.rollout.runner import rollout_program, run_rollouts
from espalier.types import Rollout

SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0}


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


def rollouts(bench, server: dict[str, Any], k: int, G: int, max_tokens: int, offset: int = 0) -> list[Rollout]:
    """One step's rollouts: k training claims (from `offset`) x G runs, `threads` in flight."""
    program = rollout_program(make_program(bench, make_lm(server, max_tokens)), True, {**SAMPLING, "logprobs": True})
    examples = [(i, bench.data.train[i % len(bench.data.train)]) for i in range(offset, offset + k)]
    return run_rollouts([program], examples, G, recall, 0.0, -1.0, bench.sizes.threads, PrefillChatAdapter(),
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
