"""Whether bf16 is the faster precision on a device, by measurement rather than by assumption.

On a CPU with AMX or AVX512-BF16, bf16 matmuls run several times faster than fp32; on one
with AVX2 only (e.g. many AMD EPYC cloud cores), PyTorch emulates them and bf16 autocast
made SmolLM2-135M's prefill about 6x slower than fp32 (BENCHMARKS.md, "precision"). The engine's
prefill and the recipe's `bf16` default follow `fast_bf16(device)`: a CUDA device that supports
bf16 says yes; a CPU answers by timing one model-sized matmul both ways (about 50 ms, once per
process).
"""

from __future__ import annotations

import functools
import logging
import time

import torch

logger = logging.getLogger("espalier")
SHAPE = (128, 576, 1536)  # (tokens, hidden, intermediate): one MLP projection of a ~135M model's prefill
MARGIN = 1.2  # bf16 must be this much faster to be chosen: it costs precision


@functools.cache
def bf16_speedup(device: str = "cpu") -> float:
    """fp32 time / bf16 time of one matmul of `SHAPE` on `device` (> 1: bf16 is faster)."""
    m, k, n = SHAPE
    x, w = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    return _best_time(x, w) / _best_time(x.bfloat16(), w.bfloat16())


def fast_bf16(device: str = "cpu") -> bool:
    """Whether to run compute-bound work (prefill, training forward passes) in bf16 on `device`."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_bf16_supported()
    if kind != "cpu":
        return False
    speedup = bf16_speedup("cpu")
    logger.debug("bf16 matmul speed-up over fp32 on this CPU: %.2fx", speedup)
    return speedup >= MARGIN


def _best_time(x: torch.Tensor, w: torch.Tensor, reps: int = 5) -> float:
    with torch.inference_mode():
        x @ w  # the first call sets up the kernel
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            x @ w
            best = min(best, time.perf_counter() - start)
    return best
