"""Run a benchmark function in a fresh spawned process: its memory peak is its own, its imports do not leak.

The function must be importable (module level); its arguments and result must pickle. The
child reports its own peak resident memory (`peak_rss_mb`) next to the function's result.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def _call(fn: Callable[..., dict[str, Any]], args: tuple, kwargs: dict[str, Any], threads: int | None) -> dict:
    import torch

    from benchmarks.memory import peak_rss_mb

    if threads:
        torch.set_num_threads(threads)
    result = fn(*args, **kwargs)
    return {**result, "peak_rss_mb": peak_rss_mb()}


def run_isolated(fn: Callable[..., dict[str, Any]], *args: Any, threads: int | None = None, **kwargs: Any) -> dict:
    """`fn(*args, **kwargs)` in a spawned child process; its dict result plus the child's `peak_rss_mb`."""
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_call, fn, args, kwargs, threads).result()
