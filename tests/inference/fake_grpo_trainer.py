"""A stand-in for `GRPOTrainer` in job tests: random adapters, optional crash, no learning.

Pickled by reference into the job's worker process (the class is its own `TrainerFactory`), so it
must live on the test path and import nothing from the tests' conftest.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from espalier.types import StepMetrics


class FakeTrainer:
    @staticmethod
    def check(train_kwargs: dict[str, Any]) -> None:
        if "bogus" in train_kwargs:
            raise ValueError("unknown train_kwargs key 'bogus'")

    def __init__(self, model_path: Path, train_kwargs: dict[str, Any], device: str, processes=None,
                 on_fed=None) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        if "bogus" in train_kwargs:
            raise ValueError("unknown train_kwargs key 'bogus'")
        self.kwargs = train_kwargs
        self.optimizer_steps = 0
        self.seen: list[int] = []  # samples per step, for the test to read back through metrics
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        self.model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path), config)

    def train_step(self, groups) -> list[StepMetrics]:
        if self.kwargs.get("die_at_step") == self.optimizer_steps + 1:
            os._exit(3)
        once = self.kwargs.get("die_once_marker")
        if once and not Path(once).exists():
            Path(once).write_text("died")
            os._exit(9)
        time.sleep(float(self.kwargs.get("step_seconds", 0.0)))  # a step that takes a while (a stop waits for it)
        self.optimizer_steps += 1
        n = sum(len(g.samples) for g in groups)
        tokens = sum(len(s.completion_ids) for g in groups for s in g.samples)
        with torch.no_grad():
            torch.manual_seed(self.optimizer_steps)
            for name, p in self.model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.5)
        return [StepMetrics(self.optimizer_steps, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, float(tokens) / n, 0.0, 0.0,
                            0.0, 0.0, n)]

    def export_adapter(self, directory: Path) -> Path:
        self.model.save_pretrained(directory)
        return Path(directory)

    def save_checkpoint(self, directory: Path) -> None:
        self.export_adapter(Path(directory) / "adapter")
        (Path(directory) / "state.json").write_text(json.dumps({"optimizer_steps": self.optimizer_steps}))

    def load_checkpoint(self, directory: Path) -> None:
        self.optimizer_steps = json.loads((Path(directory) / "state.json").read_text())["optimizer_steps"]
