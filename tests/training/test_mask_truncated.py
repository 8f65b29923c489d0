"""`mask_truncated_completions`: a completion the engine cut at its token limit is left out of the loss."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from espalier.config import TrainConfig
from espalier.training import GRPOTrainer
from espalier.training.batch import build_sequences
from espalier.types import Group, Sample

NO_DROPOUT = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj"]}
# Advantages (r - group mean, unscaled): +1, -1 in group a; +0.5, -0.5 in group b. The 4-token +0.5 one was cut.
GROUPS = [
    Group((Sample((5, 6, 7), (10, 11), 2.0), Sample((5, 6, 7), (12,), 0.0)), key="a"),
    Group((Sample((8, 9), (13, 14, 15, 16), 1.0, truncated=True), Sample((8, 9), (17, 18, 19), 0.0)), key="b"),
]


def test_truncated_samples_are_dropped_after_the_advantages_and_counted():
    sequences, cut = build_sequences(GROUPS, [1.0, -1.0, 0.5, -0.5], None, None, mask_truncated_completions=True)
    assert [s.completion_ids for s in sequences] == [(10, 11), (12,), (17, 18, 19)]
    assert [s.advantage for s in sequences] == [1.0, -1.0, -0.5]  # the cut sample still shaped its group's mean
    assert cut.masked == 1
    kept, cut = build_sequences(GROUPS, [1.0, -1.0, 0.5, -0.5], None, None)
    assert len(kept) == 4 and cut.masked == 0  # off by default, as in TRL


def test_sample_round_trips_its_truncated_flag():
    group = Group.from_dict(GROUPS[1].to_dict())
    assert [s.truncated for s in group.samples] == [True, False]
    assert TrainConfig().mask_truncated_completions is False
    assert TrainConfig.from_kwargs({"mask_truncated_completions": True}).mask_truncated_completions is True


@pytest.mark.parametrize("mask", [True, False])
def test_dapo_loss_leaves_the_cut_completion_out_of_loss_and_normaliser(tiny_llama_dir: Path, mask: bool):
    config = {"learning_rate": 1e-2, "lora_config": NO_DROPOUT, "scale_rewards": "none", "loss_type": "dapo",
              "per_device_train_batch_size": 4, "mask_truncated_completions": mask}
    trainer = GRPOTrainer(tiny_llama_dir, TrainConfig.from_kwargs(config))
    [metrics] = trainer.train_step(GROUPS)
    # First optimizer batch: the ratio is 1, so the dapo loss is sum(-A_i * len_i) / sum(len_i) over the kept ones.
    kept = [(1.0, 2), (-1.0, 1), (-0.5, 3)] + ([] if mask else [(0.5, 4)])
    expected = sum(-a * n for a, n in kept) / sum(n for _, n in kept)
    assert metrics.loss == pytest.approx(expected, abs=1e-6)
    assert metrics.num_sequences == len(kept) and metrics.extra["masked_truncated_completions"] == float(mask)


def test_a_step_whose_every_completion_was_cut_still_reports(tiny_llama_dir: Path):
    config = {"lora_config": NO_DROPOUT, "mask_truncated_completions": True}
    trainer = GRPOTrainer(tiny_llama_dir, TrainConfig.from_kwargs(config))
    cut = [Group(tuple(replace(s, truncated=True) for s in g.samples)) for g in GROUPS]
    [metrics] = trainer.train_step(cut)
    assert metrics.num_sequences == 0 and metrics.extra["masked_truncated_completions"] == 4.0
    assert trainer.optimizer_steps == 0
