"""The data that crosses Espalier's package boundaries.

The compiler (user process) produces `LMCall`s and `Rollout`s, turns them into `Group`s of
`Sample`s and sends them to the GRPO job; the trainer consumes `Group`s and returns
`StepMetrics`. Everything here is plain, immutable and JSON-friendly (`to_dict` /
`from_dict`) so it crosses the HTTP boundary unchanged.

Departures from DSPy/Arbor:
1. A sample carries the exact prompt and completion token ids that the engine sampled
   (Arbor carries chat messages and re-renders them with another adapter).
2. A sample may carry the sampling log-probs of its completion tokens, so importance
   ratios are taken against the policy that actually sampled.
3. A call and its sample know whether the engine cut them at the token limit (`truncated`,
   from the finish reason); TRL/Arbor guess it from the last token not being EOS.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class LMCall:
    """One call of one predictor to the model, exactly as sampled."""

    predictor: str  # the predictor's name in the program, e.g. "append_notes.predict"
    invocation: int  # 0 for the predictor's first call in a run, 1 for its second, ...
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None = None  # one per completion token, at the sampling temperature
    messages: tuple[dict[str, str], ...] = ()  # the chat messages, for logs and Arbor-compatible clients
    completion_text: str = ""
    truncated: bool = False  # the engine stopped it at the token limit (finish_reason "length")


@dataclass(frozen=True)
class Rollout:
    """One run of the program on one example: its calls, reward and what went wrong."""

    example_index: int
    calls: tuple[LMCall, ...]
    reward: float
    failure: str | None = None  # None for a clean run; else "format: ..." or "error: ..."
    fallback_calls: int = 0  # DSPy's JSONAdapter retries of a failed parse (capture.py): left out of training


@dataclass(frozen=True)
class Sample:
    """One training sequence: prompt + completion token ids and the reward of its run."""

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    reward: float
    logprobs: tuple[float, ...] | None = None
    truncated: bool = False  # cut at the token limit; `mask_truncated_completions` leaves it out of the loss

    def __post_init__(self) -> None:
        if not self.prompt_ids or not self.completion_ids:
            raise ValueError("a Sample needs at least one prompt token and one completion token")
        if not all(type(t) is int and t >= 0 for t in (*self.prompt_ids, *self.completion_ids)):
            raise ValueError("prompt_ids and completion_ids must be lists of non-negative integer token ids")
        if self.logprobs is not None and len(self.logprobs) != len(self.completion_ids):
            raise ValueError(
                f"logprobs has {len(self.logprobs)} entries for {len(self.completion_ids)} completion tokens"
            )
        if self.logprobs is not None and not all(is_finite_number(x) and x <= 1e-3 for x in self.logprobs):
            raise ValueError("logprobs must be finite log-probabilities (<= 0); a sampled token has a finite one")
        if not is_finite_number(self.reward):
            raise ValueError(f"reward must be a finite number, got {self.reward}")


def is_finite_number(x: Any) -> bool:
    """A finite number (a huge JSON integer overflows `math.isfinite`: not finite either)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


@dataclass(frozen=True)
class Group:
    """Samples that answer the same prompt slot (example, predictor, invocation): the GRPO group."""

    samples: tuple[Sample, ...]
    key: str = ""  # e.g. "ex12/append_notes.predict/0", for logs

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "samples": [asdict(s) for s in self.samples]}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Group:
        samples = tuple(
            Sample(
                prompt_ids=tuple(s["prompt_ids"]),
                completion_ids=tuple(s["completion_ids"]),
                reward=float(s["reward"]),
                logprobs=None if s.get("logprobs") is None else tuple(s["logprobs"]),
                truncated=bool(s.get("truncated", False)),
            )
            for s in data["samples"]
        )
        return Group(samples=samples, key=data.get("key", ""))


@dataclass
class StepMetrics:
    """What one optimizer step reports. Floats only, so it logs anywhere."""

    step: int
    loss: float
    reward_mean: float
    reward_std: float
    advantage_std: float
    clip_ratio_low: float
    clip_ratio_high: float
    kl: float
    completion_length_mean: float
    completion_length_max: float
    tokens_per_second: float
    grad_norm: float
    learning_rate: float
    num_sequences: int
    extra: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: a non-finite value (a skipped NaN update's loss or gradient norm) is None."""
        return {k: _finite_or_none(v) for k, v in asdict(self).items()}



@dataclass(frozen=True)
class JobStatus:
    """A GRPO job as the server reports it after every job request: Arbor's status fields, plus Espalier's.

    `metrics` are the last step's `StepMetrics.to_dict()`s; `checkpoints` maps a name to Arbor's
    checkpoint record plus the `model` that serves it."""

    job_id: str
    status: str  # initializing | running | failed | cancelled | terminated
    current_model: str = ""
    steps: int = 0  # GRPO steps trained and published
    optimizer_steps: int = 0
    checkpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_checkpoint: str | None = None
    pending_batch_ids: tuple[int, ...] = ()  # Arbor's: the batches the job waits for
    error: str | None = None
    trainer_restarts: int = 0
    last_swap_ms: float | None = None  # how long publishing the last step's policy took
    metrics: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["checkpoint_models"] = {name: record["model"] for name, record in self.checkpoints.items()}
        return {**data, "pending_batch_ids": list(self.pending_batch_ids), "metrics": list(self.metrics)}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> JobStatus:
        """A status body; fields this version does not know are ignored (a newer server may add some)."""
        known = {f: data[f] for f in JobStatus.__dataclass_fields__ if f in data}
        return JobStatus(**{**known, "pending_batch_ids": tuple(known.get("pending_batch_ids", ())),
                            "metrics": tuple(known.get("metrics", ()))})


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
