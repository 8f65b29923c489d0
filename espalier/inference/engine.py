"""The engine contract: what the server asks of vLLM or of the transformers engine.

An engine takes prompt token ids (the server applies the chat template) and returns the
completion token ids exactly as sampled, with their log-probs. It serves the base model plus
named LoRA adapters that are loaded and unloaded at run time.

Departures from Arbor:
1. The engine is a Protocol with two small implementations, not a manager class that owns
   processes, ports and NCCL groups at once.
2. Adapters are loaded by name (a peft directory); nothing is broadcast after a step. vLLM
   runs them as LoRA kernels; the transformers engine merges the one in use into its own
   served weights (`lora.py`, W0 kept for `@base` and the other adapters).
3. Log-probs are those of the distribution that sampled (after repetition penalty,
   temperature, top-k and top-p), as vLLM's `processed_logprobs`; with the recipe's
   `top_k=-1, top_p=1` this is `log_softmax(logits / T)`, what the trainer computes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class EngineError(RuntimeError):
    """A request the engine accepted could not be completed (the engine failed or died)."""


class EngineUnavailable(EngineError):
    """The engine is not running (dead, restarting or closed)."""


@dataclass(frozen=True)
class GenerateRequest:
    """One completion request in token ids, with its sampling parameters."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 = off
    repetition_penalty: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    adapter: str | None = None  # None = the base model
    logprobs: bool = True
    top_logprobs: int = 0  # > 0: also the k most likely tokens at each position, under the sampling distribution
    # Set when nobody waits for the answer any more (the HTTP client went away): the transformers engine drops the
    # request's rows at its next decode step; the vLLM engine asks its server to abort it (/abort_requests).
    cancel: threading.Event | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("prompt_ids is empty")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {self.top_logprobs}")


@dataclass(frozen=True)
class GeneratedSequence:
    """One sampled completion: its token ids, text and per-token sampling log-probs."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    logprobs: tuple[float, ...] | None = None  # one per token id
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None  # per token: (id, logprob), most likely first


class Engine(Protocol):
    """Serves a base model plus named LoRA adapters."""

    max_model_len: int
    tokenizer: PreTrainedTokenizerBase  # the model's; the server renders chat templates with it

    def generate(self, request: GenerateRequest, timeout: float | None = None) -> list[GeneratedSequence]:
        """Sample `request.n` completions; raises EngineError on failure or timeout."""
        ...

    def load_adapter(self, name: str, path: Path, policy: bool = False) -> None:
        """Serve the peft adapter at `path` as `name`; `policy`: the one most requests will use (vLLM on CPU merges
        it into the served weights)."""
        ...

    def unload_adapter(self, name: str) -> None: ...

    def adapters(self) -> dict[str, Path]: ...

    def alive(self) -> bool: ...

    def restart(self) -> None:
        """Bring a dead engine back with the adapters it had."""
        ...

    def close(self) -> None: ...


def split_rows(request: GenerateRequest, rows: int) -> list[GenerateRequest]:
    """A request for `n` rows as requests of at most `rows` rows, each seeded where it would have been
    (row j draws from seed + j), so memory stays within the batch cap and a seeded answer does not change."""
    if request.n <= rows:
        return [request]
    return [replace(request, n=min(rows, request.n - start), seed=None if request.seed is None else request.seed + start)
            for start in range(0, request.n, rows)]
