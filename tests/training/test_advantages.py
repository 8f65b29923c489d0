from __future__ import annotations

import pytest

from espalier.training.advantages import STD_EPS, compute_advantages
from espalier.types import Group, Sample


def _group(*rewards: float) -> Group:
    return Group(tuple(Sample((1,), (2,), r) for r in rewards))


GROUPS = [_group(1.0, 0.0, 0.0, 1.0), _group(3.0, 3.0), _group(2.0, 0.0)]


def test_none_is_reward_minus_group_mean() -> None:
    assert compute_advantages(GROUPS, "none") == pytest.approx([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 1.0, -1.0])


def test_group_scales_by_group_std() -> None:
    # group 1: std 0.5; group 2: std 0 (advantages stay 0); group 3: std 1
    expected = [0.5 / (0.5 + STD_EPS)] * 4
    expected = [e * s for e, s in zip(expected, [1, -1, -1, 1], strict=True)] + [
        0.0,
        0.0,
        1 / (1 + STD_EPS),
        -1 / (1 + STD_EPS),
    ]
    assert compute_advantages(GROUPS, "group") == pytest.approx(expected)


def test_batch_scales_by_std_of_all_rewards() -> None:
    rewards = [1, 0, 0, 1, 3, 3, 2, 0]
    mean = sum(rewards) / 8  # 1.25
    std = (sum((r - mean) ** 2 for r in rewards) / 8) ** 0.5
    centred = [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 1.0, -1.0]
    assert compute_advantages(GROUPS, "batch") == pytest.approx([c / (std + STD_EPS) for c in centred])
