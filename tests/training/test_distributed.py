"""Two CPU training processes (gloo) end a step with identical adapters, equal to one process's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from espalier.config import TrainConfig
from espalier.training import GRPOTrainer
from espalier.training.distributed import init_processes, launch
from espalier.types import Group, Sample

KWARGS = {
    "learning_rate": 1e-2,
    "gradient_accumulation_steps": 2,
    "loss_type": "dapo",
    "lora_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
}
GROUPS = [
    Group(tuple(Sample((4, 5, 6 + i), tuple(range(10 + i, 13 + 2 * i)), float(i % 3)) for i in range(5))),
    Group(tuple(Sample((7, 8), tuple(range(20, 22 + i)), float(i % 2)) for i in range(5))),
]


def _weights(trainer: GRPOTrainer) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in trainer.params])


def _worker(model_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    processes = init_processes()
    trainer = GRPOTrainer(
        model_dir, TrainConfig.from_kwargs(KWARGS | {"per_device_train_batch_size": 2}), processes=processes
    )
    metrics = trainer.train_step(GROUPS)  # 10 sequences, optimizer batches of 2 x 2 x 2 = 8: 8 then 2
    torch.save(
        {"weights": _weights(trainer), "losses": [m.loss for m in metrics]}, Path(out_dir) / f"rank{processes.rank}.pt"
    )


@pytest.mark.slow
def test_two_processes_match_each_other_and_one_process(tiny_llama_dir: Path, tmp_path: Path) -> None:
    launch(_worker, 2, args=(str(tiny_llama_dir), str(tmp_path)))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(rank0["weights"], rank1["weights"])
    assert rank0["losses"] == rank1["losses"]

    single = GRPOTrainer(tiny_llama_dir, TrainConfig.from_kwargs(KWARGS | {"per_device_train_batch_size": 4}))
    losses = [m.loss for m in single.train_step(GROUPS)]  # same optimizer batches of 8 then 2 on one process
    assert losses == pytest.approx(rank0["losses"], abs=1e-6)
    torch.testing.assert_close(_weights(single), rank0["weights"], atol=1e-6, rtol=1e-5)
