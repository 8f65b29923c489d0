"""Save, reload and continue gives the same next losses; the exported adapter loads with peft."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from espalier.config import TrainConfig
from espalier.models import load_causal_lm
from espalier.training import GRPOTrainer
from espalier.types import Group, Sample

KWARGS = {
    "learning_rate": 1e-2,
    "per_device_train_batch_size": 2,
    "beta": 0.1,  # the KL term makes the loss depend on the adapter weights
    "lora_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
    "lr_scheduler_type": "cosine",
    "warmup_steps": 1,
    "max_steps": 10,
}


def _groups(seed: int) -> list[Group]:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(4):
        completion = tuple(torch.randint(3, 60, (3 + i,), generator=g).tolist())
        logprobs = tuple((-torch.rand(len(completion), generator=g) * 4).tolist())  # as an engine would report
        samples.append(Sample((4, 5, 6 + i), completion, float(i % 2), logprobs))
    return [Group(tuple(samples[:2])), Group(tuple(samples[2:]))]


def _weights(trainer: GRPOTrainer) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in trainer.params])


def test_save_reload_continue_gives_the_same_losses(tiny_llama_dir: Path, tmp_path: Path) -> None:
    config = TrainConfig.from_kwargs(KWARGS)
    original = GRPOTrainer(tiny_llama_dir, config)
    original.train_step(_groups(0))
    original.save_checkpoint(tmp_path / "ckpt")
    original.save_checkpoint(tmp_path / "ckpt")  # overwriting an existing checkpoint is atomic too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    expected = original.train_step(_groups(1))

    resumed = GRPOTrainer(tiny_llama_dir, config)
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert resumed.optimizer_steps == 2
    got = resumed.train_step(_groups(1))
    assert [m.loss for m in got] == pytest.approx([m.loss for m in expected], abs=1e-7)
    assert [m.learning_rate for m in got] == pytest.approx([m.learning_rate for m in expected])
    fresh = GRPOTrainer(tiny_llama_dir, config).train_step(_groups(1))  # not vacuous: state matters
    # The first batch's ratio is 1 whatever the state, so state shows in its KL (0 for a fresh adapter), then the loss.
    assert fresh[0].kl == 0.0 and expected[0].kl > 1e-6 and abs(fresh[1].loss - expected[1].loss) > 1e-4
    torch.testing.assert_close(_weights(resumed), _weights(original), atol=0, rtol=0)


def test_exported_adapter_loads_with_peft_in_vllm_layout(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import peft

    trainer = GRPOTrainer(tiny_llama_dir, TrainConfig.from_kwargs(KWARGS))
    trainer.train_step(_groups(0))
    out = trainer.export_adapter(tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_llama_dir) and config["r"] == 4
    from safetensors.torch import load_file

    keys = list(load_file(out / "adapter_model.safetensors"))
    assert keys and all(k.startswith("base_model.model.model.layers.") and ".lora_" in k for k in keys)

    loaded = peft.PeftModel.from_pretrained(load_causal_lm(tiny_llama_dir), out).eval()
    trainer.model.eval()
    ids = torch.tensor([[4, 5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trainer.model(input_ids=ids).logits)


def test_replacing_a_directory_is_one_swap_and_a_failed_write_keeps_the_old_one(tmp_path: Path) -> None:
    from espalier.training.checkpoint import _exchange, atomic_directory

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "f").write_text("a"), (b / "f").write_text("b")
    if _exchange(a, b):  # Linux: renameat2(RENAME_EXCHANGE) swapped them in one step
        assert (a / "f").read_text() == "b" and (b / "f").read_text() == "a"
    target = tmp_path / "ckpt"
    for version in ("1", "2"):
        with atomic_directory(target) as tmp:
            (tmp / "v").write_text(version)
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "v").write_text("3")
        raise RuntimeError("killed mid-write")
    assert (target / "v").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "ckpt"]
