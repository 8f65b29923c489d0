"""AdamW over the trainable (LoRA) parameters and the learning-rate schedule.

Departures from TRL:
1. linear and cosine decay need `max_steps` (the schedule's length); without it they are a
   `ValueError`, not a silent constant.
"""

from __future__ import annotations

import torch
from transformers import get_scheduler

from espalier.config import TrainConfig


def build_optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    decays = config.lr_scheduler_type in ("linear", "cosine")
    if decays and config.max_steps is None:
        raise ValueError(f"lr_scheduler_type={config.lr_scheduler_type!r} decays over max_steps; set max_steps")
    total = config.max_steps or 0
    return get_scheduler(
        config.lr_scheduler_type,
        optimizer,
        num_warmup_steps=config.warmup_for(total),
        num_training_steps=total if decays else None,
    )
