"""Group-relative advantages from the samples' rewards.

A = r - mean(group), divided by the group's std (`scale_rewards="group"`), by the std of
all rewards of the step (`"batch"`), or not at all (`"none"`).

Departures from the paper / TRL:
1. The std is the sample std (ddof 1) plus 1e-4, as in TRL and arbor-ai 0.2.17; a group whose
   rewards are all equal gets zero advantages (and so no policy gradient), never a division by
   zero; a one-sample group (ragged grouping) has no spread and gets 0.
2. "batch" scales by the std over every sample of the step, not of one process's shard.
3. An advantage below `ZERO_TOLERANCE` in magnitude is exactly 0: a numerically constant group
   (rewards 0.1, 0.1, ...) leaves rounding residue of ~1e-13 after centring, which would
   otherwise compute a whole group for a zero gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from espalier.types import Group

STD_EPS = 1e-4
ZERO_TOLERANCE = 1e-9


def _sample_std(rewards: torch.Tensor) -> torch.Tensor:
    return rewards.std(unbiased=True) if rewards.numel() > 1 else rewards.new_zeros(())


def _group_std(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    return torch.stack([_sample_std(rewards[group_ids == g]) for g in group_ids.tolist()])  # (N,)


def _batch_std(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    return _sample_std(rewards).expand_as(rewards)  # (N,)


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
    advantages = centred / (SCALES[scale_rewards](rewards, group_ids) + STD_EPS)  # (N,)
    return torch.where(advantages.abs() < ZERO_TOLERANCE, 0.0, advantages).tolist()
