"""Group-relative advantages from the samples' rewards.

A = r - mean(group), divided by the group's std (`scale_rewards="group"`), by the std of
all rewards of the step (`"batch"`), or not at all (`"none"`).

Departures from the paper / TRL:
1. The std is the population std (ddof 0) plus 1e-4, as in TRL; a group whose rewards are all
   equal gets zero advantages (and so no policy gradient), never a division by zero.
2. "batch" scales by the std over every sample of the step, not of one process's shard.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from espalier.types import Group

STD_EPS = 1e-4


def _group_std(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    return torch.stack([rewards[group_ids == g].std(unbiased=False) for g in group_ids.tolist()])  # (N,)


def _batch_std(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    return rewards.std(unbiased=False).expand_as(rewards)  # (N,)


def _no_std(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    return torch.full_like(rewards, 1.0 - STD_EPS)  # (N,), so that std + eps == 1


SCALES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "group": _group_std,
    "batch": _batch_std,
    "none": _no_std,
}


def compute_advantages(groups: Sequence[Group], scale_rewards: str) -> list[float]:
    """One advantage per sample, in the order of `groups` then of each group's samples."""
    rewards = torch.tensor([s.reward for g in groups for s in g.samples], dtype=torch.float64)  # (N,)
    group_ids = torch.tensor([i for i, g in enumerate(groups) for _ in g.samples])  # (N,)
    if rewards.numel() == 0:
        return []
    sums = torch.zeros(len(groups), dtype=torch.float64).index_add_(0, group_ids, rewards)  # (G,)
    counts = torch.bincount(group_ids, minlength=len(groups)).to(torch.float64)  # (G,)
    centred = rewards - (sums / counts)[group_ids]  # (N,)
    return (centred / (SCALES[scale_rewards](rewards, group_ids) + STD_EPS)).tolist()
