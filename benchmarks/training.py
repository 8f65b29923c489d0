"""Training: tokens/s of one GRPO optimizer step, Espalier's `GRPOTrainer` against TRL's, and MFU.

Both trainers get the same batch (random token ids of fixed prompt and completion lengths,
rewards alternating within each group, sampling log-probs supplied), the recipe's LoRA
config (r 8, alpha 16, dropout 0.05, every projection), bf16 autocast over fp32 weights,
`dapo` loss, beta 0, and the same micro-batch x accumulation. Each runs in its own fresh
process (so its memory peak is its own): a warm-up step, then `reps` timed optimizer steps.
Tokens are all prompt + completion tokens of a step. MFU takes the 6 * N * tokens
convention (N = every base parameter) over the best bf16 and fp32 2048^3 matmul of this run.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks.common import Section, Table, fmt, median, ratio
from benchmarks.isolated import run_isolated
from benchmarks.train_throughput import LORA, make_groups, matmul_peak
from espalier.types import Group

LIMITS = (
    "A few steps per trainer on random tokens of fixed length (no padding); on CPU the bf16 matmul peak, not "
    "memory, bounds both trainers. TRL's time includes its per-step bookkeeping (rollout_func, rewards, logging "
    "off) as it would in use."
)

ESPALIER, TRL = "Espalier GRPOTrainer (bf16 autocast)", "TRL GRPOTrainer (use_cpu, bf16)"


def step_groups(sizes, vocab: int, steps: int, seed: int = 0) -> list[Group]:
    """`steps` optimizer batches of `batch x accum` sequences, in groups of up to 4."""
    per_step = sizes.batch * sizes.accum
    size = next(g for g in (4, 3, 2, 1) if per_step % g == 0)
    samples = [s for g in make_groups(per_step * steps, sizes.prompt_len, sizes.completion_len, vocab, seed)
               for s in g.samples][: per_step * steps]
    return [Group(tuple(samples[i : i + size]), key=f"g{i // size}") for i in range(0, len(samples), size)]


def espalier_steps(model_dir: str, groups: list[dict], batch: int, accum: int, lora: dict, steps: int, **opts) -> dict:
    """In a child process: seconds of each `train_step` of one optimizer batch."""
    from espalier.config import TrainConfig
    from espalier.training import GRPOTrainer

    kwargs = {"per_device_train_batch_size": batch, "gradient_accumulation_steps": accum, "lora_config": lora,
              "learning_rate": 1e-6, "loss_type": "dapo", "bf16": True, "beta": 0.0, "weight_decay": 0.001,
              "max_grad_norm": 1.0, "scale_rewards": False} | opts
    trainer = GRPOTrainer(Path(model_dir), TrainConfig.from_kwargs(kwargs))
    parsed = [Group.from_dict(g) for g in groups]
    per_step = batch * accum
    samples = [s for g in parsed for s in g.samples]
    times = []
    for i in range(steps):
        batch_groups = [g for g in parsed if g.samples[0] in samples[i * per_step : (i + 1) * per_step]]
        start = time.perf_counter()
        assert len(trainer.train_step(batch_groups)) == 1
        times.append(time.perf_counter() - start)
    return {"step_seconds": times}


def measure(bench, name: str, groups: list[Group], steps: int) -> dict:
    from benchmarks.trl_step import trl_steps

    s = bench.sizes
    fn = trl_steps if name == TRL else espalier_steps
    result = run_isolated(fn, str(bench.model_dir), [g.to_dict() for g in groups], s.batch, s.accum, LORA, steps)
    timed = result["step_seconds"][1:]  # the first step is the warm-up
    tokens = s.batch * s.accum * (s.prompt_len + s.completion_len)
    return {"tokens_per_step": tokens, "step_s": median(timed), "samples_s": timed,
            "tokens_per_s": tokens / median(timed), "peak_rss_mb": result["peak_rss_mb"]}


def run(bench) -> Section:
    s = bench.sizes
    from espalier.models import load_causal_lm

    base = load_causal_lm(bench.model_dir)
    params, vocab = base.num_parameters(), base.config.vocab_size
    del base
    peaks = [(matmul_peak(torch.bfloat16), matmul_peak(torch.float32))]
    groups = step_groups(s, vocab, s.reps + 1)
    runs = {name: measure(bench, name, groups, s.reps + 1) for name in (ESPALIER, TRL)}
    peaks.append((matmul_peak(torch.bfloat16), matmul_peak(torch.float32)))  # the load moves it: keep the best
    bf16, fp32 = max(p[0] for p in peaks), max(p[1] for p in peaks)
    for r in runs.values():
        r["mfu_bf16"], r["mfu_fp32"] = 6 * params * r["tokens_per_s"] / bf16, 6 * params * r["tokens_per_s"] / fp32
    ours = runs[ESPALIER]["tokens_per_s"]
    rows = [[name, fmt(r["tokens_per_s"]), fmt(r["step_s"], 2), ratio(ours, r["tokens_per_s"]),
             f"{100 * r['mfu_bf16']:.1f}%", f"{100 * r['mfu_fp32']:.1f}%"] for name, r in runs.items()]
    table = Table(
        f"Training: one GRPO optimizer step, {s.batch} x {s.accum} sequences of {s.prompt_len} + {s.completion_len} "
        f"tokens, LoRA r 8 on every projection, {params / 1e6:.0f}M parameters",
        ["trainer", "tokens/s", "s per step", "Espalier's speed-up over it", "MFU of bf16 peak", "MFU of fp32 peak"],
        rows,
        [f"Median of {s.reps} optimizer steps after a warm-up step, each trainer in a fresh process.",
         f"Matmul peak (2048^3, best of this run): bf16 {bf16 / 1e9:.0f} GFLOP/s, fp32 {fp32 / 1e9:.0f} GFLOP/s; "
         "MFU = 6 x parameters x tokens/s over that peak (LoRA skips frozen-weight gradients: ~4N is the real work)."],
    )
    data = {"runs": runs, "parameters": params, "bf16_peak_gflops": bf16 / 1e9, "fp32_peak_gflops": fp32 / 1e9}
    return Section("training", [table], data, limits=LIMITS)
