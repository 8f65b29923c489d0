"""Shared pieces of the benchmark sections: sizes per mode, repetitions, the result types, the machine.

Every figure is the median of `reps` timed repetitions after a warm-up; the machine's
description (cores, accelerator, library versions) travels with every result.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sizes:
    """Workload sizes of one mode; `quick` aims at a few minutes on a 2-core CPU."""

    reps: int = 5  # timed repetitions per figure (median reported)
    step_reps: int = 5  # timed ArborGRPO steps of the grpo_step section (after a warm-up step)
    k: int = 4  # examples per GRPO step
    G: int = 6  # runs per example
    max_tokens: int = 64  # new tokens per LM call
    num_docs: int = 3
    num_hops: int = 2
    threads: int = 24  # program runs in flight
    batch: int = 4  # per_device_train_batch_size
    accum: int = 2  # gradient_accumulation_steps
    prompt_len: int = 384  # training sequences: prompt + completion tokens
    completion_len: int = 64
    full_reload_reps: int = 3  # repetitions of the slow "reload the whole model" alternatives
    scaling: tuple[tuple[int, int, int], ...] = ((2, 4, 32), (2, 8, 32), (4, 4, 32), (2, 4, 64), (2, 4, 128))
    scaling_reps: int = 3  # repetitions per (k, G, max tokens) row
    val_claims: int = 4  # dev claims of the ArborGRPO step's validation pass

    @staticmethod
    def quick() -> Sizes:
        """Small sizes that keep every figure: medians of 2 (one timed ArborGRPO step after a warm-up one),
        4 runs a step, one claim per validation pass.

        A run of the job's program is up to 2 LM calls (4 with `--adapter fieldwise`), each
        trained as its own sequence, and the ArborGRPO step trains every one of them, so k x G
        stays at 4 runs and calls at 32 tokens (vLLM-CPU decodes slowly with an adapter). Scaling
        keeps a row per dimension that changes the work (G, then tokens); k changes it about as G
        does (the same runs and sequences), so its row is left to the full mode."""
        return Sizes(reps=2, step_reps=1, k=2, G=2, max_tokens=32, num_docs=2, threads=4, batch=2, accum=2,
                     prompt_len=256, completion_len=48, full_reload_reps=1, scaling=((1, 2, 16), (1, 4, 16), (1, 2, 32)),
                     scaling_reps=2, val_claims=1)

    @staticmethod
    def tiny() -> Sizes:
        """For tests on a tiny random model: everything at its smallest."""
        return Sizes(reps=2, step_reps=1, k=1, G=2, max_tokens=4, num_docs=1, threads=2, batch=2, accum=1, prompt_len=16,
                     completion_len=4, full_reload_reps=1, scaling=((1, 2, 4),), scaling_reps=2, val_claims=1)


@dataclass
class Table:
    """One Markdown table: a title, column names, rows of already formatted cells, notes under it."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


@dataclass
class Section:
    """What a section returns: its tables for BENCHMARKS.md and its raw numbers for the JSON history."""

    name: str
    tables: list[Table]
    data: dict[str, Any]
    seconds: float = 0.0
    limits: str = ""  # what bounds these figures, in a sentence or two


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def spread(values: list[float]) -> str:
    """'median (min-max, n=N)' for a table cell's footnote-free context."""
    if not values:
        return "n/a"
    return f"{median(values):.3g} ({min(values):.3g}-{max(values):.3g}, n={len(values)})"


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:  # None or NaN
        return "n/a"
    return f"{value:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "n/a"
    return f"{a / b:.2f}x"


def machine() -> dict[str, Any]:
    """Cores, memory, accelerator and library versions of this machine."""
    import psutil
    import torch
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    versions["transformers"] = transformers.__version__
    for name in ("vllm", "trl", "peft", "dspy"):
        versions[name] = _version(name)
    accelerator = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
    return {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "accelerator": accelerator,
        "device": "GPU" if torch.cuda.is_available() else "CPU",
        "versions": versions,
    }


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in (package, f"{package}-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "not installed"


def describe(m: dict[str, Any]) -> str:
    v = m["versions"]
    return (
        f"{m['device']}: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), {m['memory_gib']} GiB, "
        f"accelerator {m['accelerator']}; torch {v['torch']}, vllm {v['vllm']}, transformers {v['transformers']}, "
        f"trl {v['trl']}, peft {v['peft']}, dspy {v['dspy']}"
    )


@contextlib.contextmanager
def standalone_server(model: str) -> Iterator[dict[str, Any]]:
    """A real server (transformers engine) in a temporary run directory, for the standalone scripts:
    `espalier.init`'s answer, shut down on exit."""
    from espalier.inference import launch

    with tempfile.TemporaryDirectory() as run_dir:
        info = launch.init(model=model, engine="transformers", run_dir=run_dir, timeout=900)
        try:
            yield info
        finally:
            launch.shutdown()
