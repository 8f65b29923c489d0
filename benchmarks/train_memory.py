"""Trainer peak memory and time against the micro-batch size, for the multi-hop job's sequences.

Each configuration runs one `GRPOTrainer.train_step` in a fresh process (its own memory peak)
on the same 4 groups x 6 sequences of 500-800 prompt + 64 completion tokens (the job's
shapes), with the job's train_kwargs and 8 sequences per optimizer update throughout
(micro-batch x accumulation), so only memory and speed change, not the update.

    PYTHONPATH=. python benchmarks/train_memory.py [--model ID_OR_DIR] [--sizes 8,4,2,1] [--checkpointing]
"""

from __future__ import annotations

import argparse
import random
import time

SEQUENCES_PER_UPDATE = 8


def groups(seed: int = 0) -> list:
    from espalier.types import Group, Sample

    rng = random.Random(seed)

    def sample(reward: float) -> Sample:
        prompt = tuple(rng.randint(10, 40000) for _ in range(rng.randint(500, 800)))
        return Sample(prompt, tuple(rng.randint(10, 40000) for _ in range(64)), reward)

    return [Group(tuple(sample(float(i % 2)) for i in range(6)), key=f"g{j}") for j in range(4)]


def one_step(model: str, micro_batch: int, checkpointing: bool) -> dict:
    """In a child process: build the trainer, time one step over `groups()`."""
    from espalier.config import TrainConfig
    from espalier.models import materialize_model
    from espalier.recipes.multihop.job import RunOptions, train_kwargs_for
    from espalier.training.trainer import GRPOTrainer

    options = RunOptions(batch_size=micro_batch, grad_accum=SEQUENCES_PER_UPDATE // micro_batch)
    kwargs = {**train_kwargs_for(options), "gradient_checkpointing": checkpointing, "report_to": "none"}
    trainer = GRPOTrainer(materialize_model(model), TrainConfig.from_kwargs(kwargs))
    batch = groups()
    start = time.perf_counter()
    trainer.train_step(batch)
    return {"seconds": time.perf_counter() - start, "sequences": sum(len(g.samples) for g in batch)}


def main(argv: list[str] | None = None) -> None:
    from benchmarks.isolated import run_isolated
    from espalier.recipes.multihop.job import RunOptions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=RunOptions().model)
    parser.add_argument("--sizes", default="8,4,2,1", help="micro-batch sizes (divisors of 8)")
    parser.add_argument("--checkpointing", action="store_true", help="also each size with gradient checkpointing")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if any(SEQUENCES_PER_UPDATE % s for s in sizes):
        parser.error(f"--sizes must divide {SEQUENCES_PER_UPDATE}, got {args.sizes}")
    print("| micro-batch x accumulation | gradient checkpointing | peak RSS MiB | seconds for 24 sequences |")
    print("| --- | --- | ---: | ---: |")
    for checkpointing in (False, True) if args.checkpointing else (False,):
        for size in sizes:
            r = run_isolated(one_step, args.model, size, checkpointing, threads=args.threads)
            accum = SEQUENCES_PER_UPDATE // size
            print(f"| {size} x {accum} | {'on' if checkpointing else 'off'} | {r['peak_rss_mb']:,.0f} | "
                  f"{r['seconds']:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
