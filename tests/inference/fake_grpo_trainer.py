"""A stand-in for `GRPOTrainer` in job tests: random adapters, optional crash, no learning.

`FakeFactory` is the `TrainerFactory`: pickled by reference into the job's worker process, so it must
live on the test path and import nothing from the tests' conftest. Its fields make the trainer die or
dawdle, for the tests of a dying or busy trainer.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from espalier.types import StepMetrics


@dataclass(frozen=True)
class FakeFactory:
    die_at_step: int | None = None  # every attempt at this optimizer step kills the process
    die_once_marker: str | None = None  # the first step kills the process, leaving this file behind
    step_seconds: float = 0.0  # a step that takes a while (a stop waits for it)

    def __call__(self, model_path: Path, config, device: str, processes=None, on_fed=None) -> FakeTrainer:
        return FakeTrainer(model_path, self)


class FakeTrainer:
    def __init__(self, model_path: Path, knobs: FakeFactory) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        self.knobs = knobs
        self.optimizer_steps = 0
        self.seen: list[int] = []  # samples per step, for the test to read back through metrics
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        self.model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path), config)

    def train_step(self, groups) -> list[StepMetrics]:
        if self.knobs.die_at_step == self.optimizer_steps + 1:
            os._exit(3)
        once = self.knobs.die_once_marker
        if once and not Path(once).exists():
            Path(once).write_text("died")
            os._exit(9)
        time.sleep(self.knobs.step_seconds)
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
