"""Training throughput of SmolLM2-135M-Instruct with the recipe's LoRA config.

Measures, in one run on one machine:
  - the machine's bf16 (and fp32) matmul peak on a 2048^3 product (best of runs before and after the rest);
  - a naive fp32 forward/backward (full logits, cross-entropy on the completion, AdamW);
  - Espalier's GRPOTrainer in fp32 and in bf16 autocast (logits for the completion block only,
    sampling log-probs supplied as an engine gives them, so no extra "old policy" pass);
and prints a Markdown table (tokens/s, speed-up over naive, MFU) and writes JSON to --out.

Tokens are all prompt + completion tokens of the trained sequences (no padding: every sequence
has the same length). MFU uses the 6 * N * tokens convention with N = every parameter of the
base model (embeddings included, counted once as they are tied), divided by the measured bf16
matmul peak. LoRA training does not compute gradients of the frozen weights, so the work
actually done is closer to 4 * N per token; the table gives that share too.

    python benchmarks/train_throughput.py --quick --out /tmp/train_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from espalier.config import ALL_PROJ_MODULES, TrainConfig
from espalier.models import DEFAULT_MODEL, load_causal_lm, materialize_model
from espalier.training import GRPOTrainer
from espalier.training.lora import apply_lora
from espalier.types import Group, Sample

LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": list(ALL_PROJ_MODULES)}


def matmul_peak(dtype: torch.dtype, size: int = 2048, reps: int = 5) -> float:
    """Best FLOP/s of a size^3 matmul over `reps` runs."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def make_groups(num_sequences: int, prompt_len: int, completion_len: int, vocab: int, seed: int = 0) -> list[Group]:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(num_sequences):
        prompt = tuple(torch.randint(100, vocab, (prompt_len,), generator=g).tolist())
        completion = tuple(torch.randint(100, vocab, (completion_len,), generator=g).tolist())
        logprobs = tuple((-torch.rand(completion_len, generator=g) * 5).tolist())
        samples.append(Sample(prompt, completion, float(i % 2), logprobs))
    return [Group(tuple(samples[i : i + 4])) for i in range(0, len(samples), 4)]


def naive_fp32(model_dir: Path, groups: list[Group], batch: int, steps: int) -> float:
    """Tokens/s of a plain fp32 LoRA forward + backward with full logits, one AdamW step per micro-batch."""
    torch.manual_seed(0)
    model = apply_lora(load_causal_lm(model_dir), LORA, str(model_dir))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    samples = [s for grp in groups for s in grp.samples]
    rows = [list(s.prompt_ids) + list(s.completion_ids) for s in samples]
    prompt_len = len(samples[0].prompt_ids)

    def one(step: int) -> int:
        ids = torch.tensor(rows[(step * batch) % len(rows) :][:batch])  # (B, T)
        labels = ids.clone()
        labels[:, :prompt_len] = -100  # loss on completion tokens only
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return ids.numel()

    one(0)  # warm-up
    start, tokens = time.perf_counter(), 0
    for step in range(steps):
        tokens += one(step + 1)
    return tokens / (time.perf_counter() - start)


def trainer_run(model_dir: Path, groups: list[Group], batch: int, accumulation: int, steps: int, **options) -> float:
    """Tokens/s of GRPOTrainer.train_step over `steps` optimizer steps (after one warm-up step)."""
    kwargs = {"per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation, "lora_config": LORA}
    kwargs |= {"learning_rate": 1e-6, "loss_type": "dapo"} | options
    trainer = GRPOTrainer(model_dir, TrainConfig.from_kwargs(kwargs))
    per_step = batch * accumulation
    samples = [s for grp in groups for s in grp.samples]
    warm = Group(tuple(samples[:per_step]))
    timed = Group(tuple(samples[per_step : per_step * (steps + 1)]))
    trainer.train_step([warm])
    start = time.perf_counter()
    metrics = trainer.train_step([timed])
    elapsed = time.perf_counter() - start
    assert len(metrics) == steps
    return sum(len(s.prompt_ids) + len(s.completion_ids) for s in timed.samples) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--quick", action="store_true", help="fewer steps and variants (about 2 minutes)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--completion-len", type=int, default=384)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model_dir = materialize_model(args.model)
    base = load_causal_lm(model_dir)
    params, vocab = base.num_parameters(), base.config.vocab_size
    del base
    accumulation, steps, naive_steps = (2, 2, 2) if args.quick else (2, 4, 4)
    groups = make_groups(args.batch * accumulation * (steps + 1) + 4, args.prompt_len, args.completion_len, vocab)

    peak_bf16, peak_fp32 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
    rows = {"naive fp32 (full logits)": naive_fp32(model_dir, groups, args.batch, naive_steps)}
    variants = {
        "GRPOTrainer bf16 autocast": {"bf16": True},
        "GRPOTrainer bf16, lora_dropout 0 (not the recipe)": {
            "bf16": True,
            "lora_config": LORA | {"lora_dropout": 0.0},
        },
    }
    if not args.quick:
        variants = {
            "GRPOTrainer fp32": {},
            **variants,
            "GRPOTrainer bf16 + gradient checkpointing": {"bf16": True, "gradient_checkpointing": True},
        }
    for name, options in variants.items():
        rows[name] = trainer_run(model_dir, groups, args.batch, accumulation, steps, **options)
    # On a shared machine the peak moves with the load: take the best of a measurement before and after.
    peak_bf16, peak_fp32 = max(peak_bf16, matmul_peak(torch.bfloat16)), max(peak_fp32, matmul_peak(torch.float32))

    naive = rows["naive fp32 (full logits)"]
    results = {
        "model": str(args.model),
        "parameters": params,
        "threads": args.threads,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
        "sequence_tokens": args.prompt_len + args.completion_len,
        "micro_batch": args.batch,
        "gradient_accumulation_steps": accumulation,
        "bf16_matmul_peak_gflops": peak_bf16 / 1e9,
        "fp32_matmul_peak_gflops": peak_fp32 / 1e9,
        "flops_convention": "6 * N * tokens, N = all base-model parameters (LoRA does ~4 * N: no frozen-weight grads)",
        "runs": {
            name: {
                "tokens_per_second": tps,
                "speedup_vs_naive": tps / naive,
                "mfu_6N_of_bf16_peak": 6 * params * tps / peak_bf16,
                "mfu_4N_of_bf16_peak": 4 * params * tps / peak_bf16,
            }
            for name, tps in rows.items()
        },
    }
    print(
        f"\nbf16 matmul peak {peak_bf16 / 1e9:.0f} GFLOP/s, fp32 {peak_fp32 / 1e9:.0f} GFLOP/s, {args.threads} threads"
    )
    print(f"{params / 1e6:.1f}M parameters, sequences of {args.prompt_len}+{args.completion_len} tokens\n")
    print("| run | tokens/s | x naive | MFU (6N) | MFU (4N) |\n| --- | ---: | ---: | ---: | ---: |")
    for name, run in results["runs"].items():
        print(
            f"| {name} | {run['tokens_per_second']:.0f} | {run['speedup_vs_naive']:.2f} | "
            f"{100 * run['mfu_6N_of_bf16_peak']:.1f}% | {100 * run['mfu_4N_of_bf16_peak']:.1f}% |"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
