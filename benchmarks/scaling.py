"""Scaling: how a GRPO step's time grows with G (runs per claim), k (claims) and sequence length.

For each (k, G, max new tokens): the step's rollouts through Espalier's server (the job's
engine, adapter and sampling settings), grouped as `ArborGRPO` groups them, then one
`train_step` on every group with an in-process `GRPOTrainer` (the recipe's CPU train_kwargs),
computing every sequence (the zero-advantage skip is off, so the cost does not hinge on
reward variance). Sync is left out
(it does not depend on these sizes: see the sync section). Median of `reps` repetitions per row.
"""

from __future__ import annotations

import random

from benchmarks.common import Section, Table, fmt, median, timed
from benchmarks.program import make_lm, make_program, rollouts

LIMITS = (
    "One in-process trainer with every sequence computed; rollout time is noisy at these sizes (sampled lengths "
    "vary)."
)


def groups_of(runs: list, predictors: list[str]) -> list:
    """The runs grouped as `ArborGRPO` groups them (ragged)."""
    from espalier.rollout.grouping import build_groups

    return build_groups(runs, predictors, "ragged", None, random.Random(0))


def warm_up(bench, server, trainer, predictors: list[str]) -> None:
    """Two short runs and one `train_step` on their first group: first-call costs out of the first row."""
    groups = groups_of(rollouts(bench, server, 1, 2, 4), predictors)
    if groups:
        trainer.train_step(groups[:1])


def varied(scaling: tuple[tuple[int, int, int], ...]) -> str:
    """The dimensions the rows vary, for the title: 'k, G and max new tokens' in full mode."""
    names = [name for i, name in enumerate(("k", "G", "max new tokens")) if len({row[i] for row in scaling}) > 1]
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names) or "size"


def one(bench, server, trainer, predictors, k: int, G: int, max_tokens: int) -> dict[str, float]:
    roll_s, runs = timed(lambda: rollouts(bench, server, k, G, max_tokens))
    groups = groups_of(runs, predictors)
    train_s, _ = timed(lambda: trainer.train_step(groups) if groups else [])
    samples = [x for g in groups for x in g.samples]
    return {"rollouts_s": roll_s, "train_s": train_s, "step_s": roll_s + train_s, "sequences": len(samples),
            "tokens": sum(len(x.prompt_ids) + len(x.completion_ids) for x in samples)}


def run(bench) -> Section:
    from espalier.config import TrainConfig
    from espalier.recipes.multihop.job import RunOptions, train_kwargs_for
    from espalier.training import GRPOTrainer

    s = bench.sizes
    server = bench.server(bench.grpo_engine)
    options = RunOptions(batch_size=s.batch, grad_accum=s.accum)
    trainer = GRPOTrainer(bench.model_dir, TrainConfig.from_kwargs(train_kwargs_for(options)))
    trainer.skip_zero_advantage = False  # every sequence computed: the cost does not hinge on reward variance
    predictors = [n for n, _ in make_program(bench, make_lm(server, 8)).named_predictors()]
    warm_up(bench, server, trainer, predictors)
    rows, data = [], []
    for k, G, max_tokens in s.scaling:
        reps = [one(bench, server, trainer, predictors, k, G, max_tokens) for _ in range(s.scaling_reps)]
        m = {key: median([r[key] for r in reps]) for key in reps[0]}
        data.append({"k": k, "G": G, "max_tokens": max_tokens, **m, "samples": reps})
        base = data[0]["step_s"]
        rows.append([str(k), str(G), str(max_tokens), fmt(m["sequences"], 0), fmt(m["tokens"], 0),
                     fmt(m["rollouts_s"], 1), fmt(m["train_s"], 1), fmt(m["step_s"], 1), f"{m['step_s'] / base:.2f}x"])
    table = Table(
        f"Scaling: step time against {varied(s.scaling)} ({bench.grpo_engine} engine, in-process trainer)",
        ["k", "G", "max new tokens", "sequences", "tokens trained", "rollouts s", "train s", "step s", "vs first row"],
        rows,
        [f"Median of {s.scaling_reps} steps per row after a short warm-up step; sync (constant) is not included; every "
         "sequence is trained (zero-advantage skip off), so train time is the worst case for those sizes."],
    )
    return Section("scaling", [table], {"rows": data}, limits=LIMITS)
