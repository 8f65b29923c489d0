"""TRL's `GRPOTrainer` (trl 1.16) timed on a fixed batch, for the training section's comparison.

TRL generates its own completions; here its experimental `rollout_func` hands back the batch's
exact prompt and completion ids instead, so TRL trains on the same sequences as Espalier: the
same model object setup (fp32 weights, sdpa, bf16 autocast), LoRA config, loss (`dapo`),
beta 0, micro-batch and accumulation. A callback times each optimizer step; generation,
rewards and TRL's own bookkeeping of a step are all inside that time, as they are in TRL.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import defaultdict
from typing import Any


class _StepTimer:
    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def trl_steps(model_dir: str, groups: list[dict[str, Any]], batch: int, accum: int, lora: dict, steps: int) -> dict:
    """Seconds per optimizer step of TRL's GRPOTrainer over `steps` steps on `groups` (Group.to_dict()s)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from espalier.models import load_causal_lm, load_tokenizer

    size = len(groups[0]["samples"])
    rewards = {tuple(s["completion_ids"]): s["reward"] for g in groups for s in g["samples"]}
    served: dict[str, int] = defaultdict(int)

    def rollout_func(prompts: list[str], trainer) -> dict[str, list]:
        out: dict[str, list] = {"prompt_ids": [], "completion_ids": [], "logprobs": []}
        for p in prompts:
            sample = groups[int(p)]["samples"][served[p] % size]
            served[p] += 1
            out["prompt_ids"].append(list(sample["prompt_ids"]))
            out["completion_ids"].append(list(sample["completion_ids"]))
            out["logprobs"].append(list(sample["logprobs"]))
        return out

    def reward(prompts, completions, completion_ids, **kwargs) -> list[float]:
        return [rewards[tuple(ids)] for ids in completion_ids]

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), use_cpu=True, bf16=True, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum, num_generations=size, max_steps=steps, learning_rate=1e-6, beta=0.0,
        loss_type="dapo", scale_rewards="none", temperature=1.0, max_completion_length=len(groups[0]["samples"][0]
        ["completion_ids"]), logging_steps=10_000, report_to="none", save_strategy="no", shuffle_dataset=False,
        gradient_checkpointing=False, disable_tqdm=True, weight_decay=0.001, max_grad_norm=1.0, epsilon_high=0.28,
        lr_scheduler_type="constant", dataloader_num_workers=0, seed=0,
    )
    timer = _StepTimer()
    callback = type("StepTimer", (TrainerCallback,), {"on_step_begin": timer.on_step_begin,
                                                      "on_step_end": timer.on_step_end})()
    trainer = GRPOTrainer(
        model=load_causal_lm(model_dir), reward_funcs=reward, args=config,
        train_dataset=Dataset.from_dict({"prompt": [str(i) for i in range(len(groups))]}),
        processing_class=load_tokenizer(model_dir), peft_config=LoraConfig(**lora), rollout_func=rollout_func,
        callbacks=[callback],
    )
    trainer.train()
    return {"step_seconds": timer.times}
