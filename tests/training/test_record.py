"""`on_fed` sees every sequence the trainer feeds, exactly; `SequenceRecorder` keeps the file layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from espalier.config import TrainConfig
from espalier.training import GRPOTrainer
from espalier.training.record import SequenceRecorder
from espalier.types import Group, Sample

# Group "b" has equal rewards: advantage 0, so its sequences are skipped (recorded with computed False).
GROUPS = [
    Group((Sample((5, 6, 7), (10, 11), 1.0), Sample((5, 6, 7), (12,), 0.0)), key="a"),
    Group((Sample((8, 9), (13, 14, 15), 0.5), Sample((8, 9), (16,), 0.5)), key="b"),
]


def test_on_fed_gets_every_sequence_with_its_tokens(tiny_llama_dir: Path) -> None:
    fed: list[dict] = []
    kwargs = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "scale_rewards": "none"}
    config = TrainConfig.from_kwargs(kwargs)
    GRPOTrainer(tiny_llama_dir, config, on_fed=fed.extend).train_step(GROUPS)
    got = sorted((tuple(r["prompt_ids"]), tuple(r["completion_ids"]), r["computed"], r["optimizer_step"]) for r in fed)
    want = sorted((s.prompt_ids, s.completion_ids, g.key == "a", 1) for g in GROUPS for s in g.samples)
    assert got == want
    assert sorted(r["advantage"] for r in fed) == pytest.approx([-0.5, 0.0, 0.0, 0.5])  # r - group mean


def test_recorder_writes_one_file_per_step_and_rank(tmp_path: Path) -> None:
    rank0, rank1 = SequenceRecorder(tmp_path / "trained"), SequenceRecorder(tmp_path / "trained", rank=1)
    with pytest.raises(RuntimeError, match="start_step"):
        rank0([{"x": 0}])
    for step in (1, 2):
        for recorder in (rank0, rank1):
            recorder.start_step(step)
            recorder([{"step": step, "rank": recorder.rank}, {"step": step, "rank": recorder.rank}])
    names = sorted(p.name for p in (tmp_path / "trained").iterdir())
    assert names == ["step-00001.jsonl", "step-00001.rank1.jsonl", "step-00002.jsonl", "step-00002.rank1.jsonl"]
    rows = [json.loads(line) for line in (tmp_path / "trained" / "step-00002.rank1.jsonl").read_text().splitlines()]
    assert rows == [{"step": 2, "rank": 1}] * 2
