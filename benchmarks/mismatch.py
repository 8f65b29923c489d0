"""Sampler/trainer mismatch: how far the engine's sampling log-probs are from the trainer's.

The job's rollouts (its engine, adapter and sampling settings, the recipe-shaped LoRA adapter
active) are trained at learning rate 0 by a `GRPOTrainer` holding the same adapter, once with
bf16 autocast and once in fp32 (the job uses bf16 where `precision.fast_bf16` says it is faster). The trainer's step metrics report the gap
exactly as a run logs it: mean |logp_engine - logp_trainer| per token, the share of tokens
beyond 0.1 nats, and the share whose TIS weight min(p_trainer / p_engine, 2) is capped. The
ratio of the GRPO loss does not depend on this gap (its "old" log-probs are the trainer's own);
TIS weights are what the gap changes.
"""

from __future__ import annotations

from benchmarks.common import Section, Table, fmt
from benchmarks.program import JitteredMetric, make_lm, make_program
from benchmarks.scaling import groups_of
from espalier.precision import fast_bf16

LIMITS = (
    "One step's rollouts (sampled lengths vary); the engine prefills and decodes in bf16 only where bf16 is "
    "faster, so with an fp32 engine the bf16 row shows the trainer's autocast error and the fp32 row the kernels' "
    "(batching, padding) error."
)


def trainer_with_adapter(bench, bf16: bool):
    """The job's trainer at lr 0 holding the served adapter, every sequence computed."""
    import peft
    from safetensors.torch import load_file

    from espalier.config import TrainConfig
    from espalier.recipes.multihop.job import RunOptions, train_kwargs_for
    from espalier.training import GRPOTrainer
    from espalier.training.trainer import ADAPTER_WEIGHTS

    kwargs = train_kwargs_for(RunOptions(batch_size=bench.sizes.batch, grad_accum=bench.sizes.accum))
    trainer = GRPOTrainer(bench.model_dir, TrainConfig.from_kwargs(kwargs | {"learning_rate": 0.0, "bf16": bf16}))
    peft.set_peft_model_state_dict(trainer.model, load_file(bench.adapter / ADAPTER_WEIGHTS))
    trainer.skip_zero_advantage = False  # measure every sequence, not only those with reward variance
    return trainer


def gap(metrics) -> dict[str, float]:
    """The step's gap, token-weighted over its optimizer steps."""
    tokens = sum(m.extra["mismatch_tokens"] for m in metrics)
    keys = ("mismatch_mean_abs_logprob", "mismatch_share_over_0.1", "mismatch_tis_capped_share")
    out = {k: sum(m.extra[k] * m.extra["mismatch_tokens"] for m in metrics) / max(tokens, 1) for k in keys}
    return out | {"tokens": tokens, "ratio_max_deviation": max(m.extra["ratio_max_deviation"] for m in metrics)}


def run(bench) -> Section:
    from benchmarks.program import SAMPLING, job_adapter
    from espalier.rollout.runner import rollout_program, run_rollouts

    s = bench.sizes
    server = bench.server(bench.grpo_engine)
    program = make_program(bench, make_lm(server, s.max_tokens))
    predictors = [n for n, _ in program.named_predictors()]
    runs = run_rollouts([rollout_program(program, True, {**SAMPLING, "logprobs": True})],
                        [(i, bench.data.train[i]) for i in range(s.k)], s.G, JitteredMetric(), 0.0, -1.0, s.threads,
                        job_adapter(), desc="mismatch rollouts")
    groups = groups_of(runs, predictors)
    rows, data = [], {}
    job_bf16 = fast_bf16("cpu")  # what the job and the engine choose on this machine
    for name, bf16 in (("bf16 autocast", True), ("fp32", False)):
        name += " (the job's here)" if bf16 == job_bf16 else ""
        g = gap(trainer_with_adapter(bench, bf16).train_step(groups))
        data[name] = g
        rows.append([name, fmt(g["tokens"], 0), f"{g['mismatch_mean_abs_logprob']:.4f}",
                     f"{100 * g['mismatch_share_over_0.1']:.1f}%", f"{100 * g['mismatch_tis_capped_share']:.2f}%",
                     f"{g['ratio_max_deviation']:.1e}"])
    table = Table(
        f"Sampler/trainer gap on one step of the job's rollouts ({s.k} claims x {s.G} runs, {bench.grpo_engine} "
        f"engine, prefill and decode in {'bf16' if job_bf16 else 'fp32'}, adapter active, T {SAMPLING['temperature']})",
        ["trainer", "tokens", "mean |logp gap| (nats)", "tokens over 0.1 nats", "TIS weights capped at 2",
         "max |ratio - 1| at lr 0"],
        rows,
        ["Trained at lr 0 with every sequence computed; the gap is what the job logs each step (`sampler gap`)."],
    )
    return Section("mismatch", [table], {"rows": data}, limits=LIMITS)
