"""AdamW over the trainable (LoRA) parameters and the learning-rate schedule.

Departures from TRL:
1. A schedule that needs its length (warmup_ratio, linear, cosine) gets it from `max_steps`,
   else from the caller's count (`schedule_length`); it never silently runs as constant or
   with no warm-up.
"""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler

from espalier.config import TrainConfig


def build_optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def schedule_length(config: TrainConfig, updates_per_grpo_step: int) -> int | None:
    """Optimizer updates the schedule spans: max_steps, else num_train_steps x the updates of one GRPO step."""
    if config.max_steps is not None:
        return config.max_steps
    if config.num_train_steps is not None:
        return config.num_train_steps * max(updates_per_grpo_step, 1)
    return None


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int | None
) -> torch.optim.lr_scheduler.LRScheduler:
    decays = config.lr_scheduler_type in ("linear", "cosine")
    if config.needs_schedule_length and total_steps is None:
        raise ValueError(f"lr_scheduler_type={config.lr_scheduler_type!r} / warmup_ratio need max_steps")
    total = total_steps or 0
    warmup = config.warmup_steps if config.warmup_steps else math.ceil(config.warmup_ratio * total)
    return get_scheduler(
        config.lr_scheduler_type,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=total if decays else None,
    )
