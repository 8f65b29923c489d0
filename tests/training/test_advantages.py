from __future__ import annotations

import pytest

from espalier.training.advantages import STD_EPS, compute_advantages
from espalier.types import Group, Sample


def _group(*rewards: float) -> Group:
    return Group(tuple(Sample((1,), (2,), r) for r in rewards))


GROUPS = [_group(1.0, 0.0, 0.0, 1.0), _group(3.0, 3.0), _group(2.0, 0.0)]


def test_none_is_reward_minus_group_mean() -> None:
    assert compute_advantages(GROUPS, "none") == pytest.approx([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 1.0, -1.0])


def test_group_scales_by_group_sample_std() -> None:
    # Sample std (ddof 1, as TRL and arbor-ai): group 1: sqrt(4 x 0.25 / 3); group 2: 0 (advantages stay 0);
    # group 3: sqrt(2 x 1 / 1) = sqrt(2).
    s1, s3 = (1 / 3) ** 0.5, 2**0.5
    expected = [0.5 / (s1 + STD_EPS) * sign for sign in (1, -1, -1, 1)] + [0.0, 0.0, 1 / (s3 + STD_EPS), -1 / (s3 + STD_EPS)]
    assert compute_advantages(GROUPS, "group") == pytest.approx(expected)


def test_numerically_constant_group_has_exactly_zero_advantages() -> None:
    flat = [_group(0.1, 0.1, 0.1), _group(0.7, 0.7, 0.7, 0.7, 0.7, 0.7), _group(0.3)]
    for scale in ("group", "batch", "none"):
        assert compute_advantages(flat, scale) == [0.0] * 10


def test_small_real_differences_survive_the_tolerance() -> None:
    [high, low] = compute_advantages([_group(0.1 + 2e-4, 0.1)], "none")
    assert high == pytest.approx(1e-4) and low == pytest.approx(-1e-4)


def test_batch_scales_by_std_of_all_rewards() -> None:
    rewards = [1, 0, 0, 1, 3, 3, 2, 0]
    mean = sum(rewards) / 8  # 1.25
    std = (sum((r - mean) ** 2 for r in rewards) / 7) ** 0.5  # sample std
    centred = [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 1.0, -1.0]
    assert compute_advantages(GROUPS, "batch") == pytest.approx([c / (std + STD_EPS) for c in centred])
