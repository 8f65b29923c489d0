"""Typed, validated training arguments (`train_kwargs`), checked once at the edge.

`TrainConfig.from_kwargs(train_kwargs)` accepts every key of DSPy's "RL for multi-hop
research" recipe plus the extras Espalier and DSPy's GRPO add, and returns a frozen
dataclass; everything downstream receives plain typed values.

Departures from Arbor / TRL:
1. An unknown key is a `ValueError` that lists the known keys (Arbor drops it silently).
2. `gradient_accumulation_steps` accepts an integral float such as `24/6` (the recipe's
   spelling) and rejects a fractional one such as `2.5` instead of truncating it.
3. `scale_rewards` is normalised to one of "group", "batch", "none" (True -> "group",
   False -> "none"), so no code downstream tests a bool-or-string.
4. `lora_config` keys are checked against `peft.LoraConfig`'s fields here, not when the
   trainer starts.
5. `num_training_gpus` / `num_inference_gpus` are checked against the CUDA devices present
   by `plan_devices`, which the compiler and the job call before starting anything.
6. `epsilon_high` defaults to 0.28, as in arbor-ai 0.2.17 (DAPO's clip-higher); TRL defaults
   it to `epsilon`. Set `epsilon_high=epsilon` for symmetric clipping.
7. A schedule that needs its length (`warmup_ratio`, linear, cosine) takes it from
   `max_steps`, else from `num_train_steps` GRPO steps (ArborGRPO fills it in) times the
   optimizer updates of the first step; with neither it is a `ValueError`, never a silent 0.
8. `vllm_importance_sampling_correction` / `_cap` (Arbor's and TRL's names) weight each token's
   policy loss by min(p_trainer / p_sampler, cap), whatever the engine (see trainer.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from espalier.types import is_finite_number

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
SchedulerType = Literal["constant", "constant_with_warmup", "linear", "cosine"]
ScaleRewards = Literal["group", "batch", "none"]

LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")
SCHEDULER_TYPES: tuple[str, ...] = ("constant", "constant_with_warmup", "linear", "cosine")
REPORT_TO: tuple[str, ...] = ("none", "wandb", "mlflow", "tensorboard")
MAX_LORA_RANK = 1024
ALL_PROJ_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj")


def _default_lora() -> dict[str, Any]:
    return {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": list(ALL_PROJ_MODULES)}


@dataclass(frozen=True)
class TrainConfig:
    """Everything the trainer and the rollout sampler need, typed and validated."""

    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    # Rollout sampling, resolved once by the compiler; the trainer's log-probs use the same temperature.
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    # Objective.
    loss_type: LossType = "dapo"
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float = 0.28
    scale_rewards: ScaleRewards = "group"
    # Truncated importance sampling: weight min(p_trainer / p_sampler, cap) on each token's policy loss.
    vllm_importance_sampling_correction: bool = True
    vllm_importance_sampling_cap: float = 2.0
    # Optimiser and schedule.
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    lr_scheduler_type: SchedulerType = "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_steps: int | None = None
    num_train_steps: int | None = None  # GRPO steps planned: the schedule's length when max_steps is unset
    # Compute.
    gradient_checkpointing: bool = False
    bf16: bool = False
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    mask_truncated_completions: bool = False  # True: a completion cut at the token limit is left out of the loss
    lora_config: dict[str, Any] = field(default_factory=_default_lora)
    num_training_gpus: int = 0
    num_inference_gpus: int = 0
    seed: int = 0
    num_generations: int | None = None  # DSPy's GRPO passes it; when set, every group of a step must hold that many samples
    # Logging.
    report_to: str = "none"
    log_completions: bool = False
    logging_steps: int = 1

    @staticmethod
    def known_keys() -> list[str]:
        return sorted(f.name for f in dataclasses.fields(TrainConfig))

    @classmethod
    def from_kwargs(cls, train_kwargs: dict[str, Any] | None) -> TrainConfig:
        """Validate `train_kwargs` (the recipe's dict) and build the config; `ValueError` names the fix."""
        try:
            return cls._from_kwargs(dict(train_kwargs or {}))
        except OverflowError as e:  # an integer too large for a float (JSON allows any number of digits)
            raise ValueError(f"train_kwargs: a number is too large ({e})") from e

    @classmethod
    def _from_kwargs(cls, kwargs: dict[str, Any]) -> TrainConfig:
        unknown = sorted(set(kwargs) - set(cls.known_keys()))
        if unknown:
            raise ValueError(f"unknown train_kwargs key(s) {unknown}; known keys are: {', '.join(cls.known_keys())}")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
            if name in kwargs:
                kwargs[name] = _positive_int(name, kwargs[name])
        for name in ("max_steps", "max_prompt_length", "max_completion_length", "num_train_steps"):
            if kwargs.get(name) is not None:
                kwargs[name] = _positive_int(name, kwargs[name], allow_minus_one=name == "max_steps")
        if kwargs.get("max_steps") == -1:
            kwargs["max_steps"] = None  # TRL's spelling of "no cap"
        for name in ("warmup_steps", "num_training_gpus", "num_inference_gpus", "seed"):
            if name in kwargs:
                kwargs[name] = _int(name, kwargs[name], minimum=0)
        if "top_k" in kwargs:
            kwargs["top_k"] = _int("top_k", kwargs["top_k"], minimum=-1)
        if kwargs.get("num_generations") is not None:
            kwargs["num_generations"] = _positive_int("num_generations", kwargs["num_generations"])
        if "scale_rewards" in kwargs:
            kwargs["scale_rewards"] = _scale_rewards(kwargs["scale_rewards"])
        if "lora_config" in kwargs:
            kwargs["lora_config"] = _lora_config(kwargs["lora_config"])
        if "report_to" in kwargs:
            kwargs["report_to"] = _report_to(kwargs["report_to"])
        config = cls(**kwargs)
        config._check_values()
        return config

    def _check_types(self) -> None:
        """Numbers are finite numbers and flags are booleans (JSON can send "abc", NaN or 1e999 for either)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("float", "float | None") and not (value is None and f.type == "float | None"):
                if not is_finite_number(value):
                    raise ValueError(f"train_kwargs[{f.name!r}] = {value!r} must be a finite number")
            if f.type == "bool" and not isinstance(value, bool):
                raise ValueError(f"train_kwargs[{f.name!r}] = {value!r} must be true or false")

    def _check_values(self) -> None:
        self._check_types()
        _choice("loss_type", self.loss_type, LOSS_TYPES)
        _choice("lr_scheduler_type", self.lr_scheduler_type, SCHEDULER_TYPES)
        checks = [
            ("temperature", self.temperature > 0, "must be > 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("beta", self.beta >= 0, "must be >= 0 (0 disables the reference pass)"),
            ("epsilon", 0 <= self.epsilon < 1, "must be in [0, 1)"),
            ("epsilon_high", self.epsilon_high >= 0, "must be >= 0"),
            ("learning_rate", self.learning_rate >= 0, "must be >= 0"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("max_grad_norm", self.max_grad_norm is None or self.max_grad_norm > 0, "must be > 0 or None"),
            ("warmup_ratio", 0 <= self.warmup_ratio <= 1, "must be in [0, 1]"),
            ("vllm_importance_sampling_cap", self.vllm_importance_sampling_cap >= 1, "must be >= 1"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"train_kwargs[{name!r}] = {getattr(self, name)!r} {why}")
        if self.needs_schedule_length and self.max_steps is None and self.num_train_steps is None:
            what = f"warmup_ratio={self.warmup_ratio}" if self.warmup_ratio else f"lr_scheduler_type={self.lr_scheduler_type!r}"
            raise ValueError(
                f"train_kwargs: {what} needs the schedule's length: set max_steps (optimizer updates), "
                "or num_train_steps (GRPO steps; ArborGRPO sets it), or use warmup_steps"
            )

    @property
    def total_batch_size(self) -> int:
        """Sequences per optimizer step on one process (multiply by the number of processes)."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def needs_schedule_length(self) -> bool:
        return (self.warmup_ratio > 0 and not self.warmup_steps) or self.lr_scheduler_type in ("linear", "cosine")

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps: `warmup_steps` when set, else `warmup_ratio` of the total."""
        return self.warmup_steps if self.warmup_steps else math.ceil(self.warmup_ratio * total_steps)


@dataclass(frozen=True)
class DevicePlan:
    """Which CUDA devices train and which serve; empty lists mean CPU."""

    training: tuple[int, ...]
    inference: tuple[int, ...]

    @property
    def colocated(self) -> bool:
        return bool(set(self.training) & set(self.inference))


def plan_devices(num_training_gpus: int, num_inference_gpus: int, available: int | None = None) -> DevicePlan:
    """Assign CUDA devices; more than the machine has is a `ValueError` with the numbers.

    Inference takes the first devices and training the next ones; when the machine has fewer
    devices than both together (e.g. one GPU for 1 + 1), they share (colocated mode).
    """
    if available is None:
        import torch

        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for name, wanted in (("num_training_gpus", num_training_gpus), ("num_inference_gpus", num_inference_gpus)):
        if wanted > available:
            raise ValueError(
                f"train_kwargs[{name!r}] = {wanted} but this machine has {available} CUDA device(s); "
                f"set it to at most {available} (0 = CPU)"
            )
    inference = tuple(range(num_inference_gpus))
    if num_training_gpus + num_inference_gpus <= available:
        training = tuple(range(num_inference_gpus, num_inference_gpus + num_training_gpus))
    else:
        training = tuple(range(available - num_training_gpus, available))
    return DevicePlan(training=training, inference=inference)


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not float(value).is_integer():
        raise ValueError(
            f"train_kwargs[{name!r}] = {value!r} must be a whole number (an integral float like 24/6 is fine)"
        )
    if value < minimum:
        raise ValueError(f"train_kwargs[{name!r}] = {value!r} must be >= {minimum}")
    return int(value)


def _positive_int(name: str, value: Any, allow_minus_one: bool = False) -> int:
    if allow_minus_one and value == -1:
        return -1
    return _int(name, value, minimum=1)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"train_kwargs[{name!r}] = {value!r}; choose one of {list(choices)}")


def _scale_rewards(value: Any) -> str:
    if value is True:
        return "group"
    if value is False or value is None:
        return "none"
    _choice("scale_rewards", value, ("group", "batch", "none"))
    return value


def _report_to(value: Any) -> str:
    value = "none" if value in (None, [], "") else value
    if isinstance(value, list | tuple):
        if len(value) != 1:
            raise ValueError(f"train_kwargs['report_to'] = {value!r}; give one of {list(REPORT_TO)}")
        value = value[0]
    _choice("report_to", value, REPORT_TO)
    return value


def _lora_config(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(
            f"train_kwargs['lora_config'] must be a dict of peft.LoraConfig fields, got {type(value).__name__}"
        )
    import peft

    known = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(
            f"unknown lora_config key(s) {unknown}; peft.LoraConfig fields are: {', '.join(sorted(known))}"
        )
    merged = {**_default_lora(), **value}
    r = merged["r"]
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= MAX_LORA_RANK:
        raise ValueError(f"lora_config['r'] = {r!r} must be an integer in [1, {MAX_LORA_RANK}]")
    alpha, dropout = merged["lora_alpha"], merged["lora_dropout"]
    if not is_finite_number(alpha):
        raise ValueError(f"lora_config['lora_alpha'] = {alpha!r} must be a finite number")
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ValueError(f"lora_config['lora_dropout'] = {dropout!r} must be in [0, 1)")
    return merged
