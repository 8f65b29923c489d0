from __future__ import annotations

import pytest

from espalier.config import TrainConfig, plan_devices

RECIPE = {
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 24 / 6,
    "temperature": 1.0,
    "top_k": -1,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "beta": 0.00,
    "learning_rate": 1e-6,
    "gradient_checkpointing": True,
    "bf16": True,
    "lr_scheduler_type": "constant_with_warmup",
    "loss_type": "dapo",
    "max_steps": 1000,
    "report_to": "wandb",
    "log_completions": True,
    "logging_steps": 1,
    "max_prompt_length": None,
    "max_completion_length": None,
    "scale_rewards": False,
    "max_grad_norm": 1.0,
    "lora_config": {
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "r": 8,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"],
    },
    "num_training_gpus": 3,
    "num_inference_gpus": 1,
    "weight_decay": 0.001,
}


def test_every_recipe_key_is_accepted() -> None:
    config = TrainConfig.from_kwargs(RECIPE)
    for key, value in RECIPE.items():
        if key not in ("gradient_accumulation_steps", "scale_rewards", "lora_config"):
            assert getattr(config, key) == value, key
    assert config.gradient_accumulation_steps == 4 and isinstance(config.gradient_accumulation_steps, int)
    assert config.scale_rewards == "none"
    assert config.lora_config["r"] == 8 and config.lora_config["lora_dropout"] == 0.05
    assert config.total_batch_size == 8
    assert (config.epsilon, config.epsilon_high) == (0.2, 0.28)


def test_fractional_accumulation_is_rejected() -> None:
    with pytest.raises(ValueError, match="gradient_accumulation_steps.*whole number"):
        TrainConfig.from_kwargs({"gradient_accumulation_steps": 2.5})


def test_unknown_key_lists_known_keys() -> None:
    with pytest.raises(ValueError) as err:
        TrainConfig.from_kwargs({"learning_rat": 1e-5})
    message = str(err.value)
    assert "learning_rat" in message
    for key in ("learning_rate", "epsilon_high", "num_generations", "warmup_ratio", "lora_config"):
        assert key in message


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss_type": "ppo"}, "loss_type"),
        ({"lr_scheduler_type": "step"}, "lr_scheduler_type"),
        ({"scale_rewards": "sequence"}, "scale_rewards"),
        ({"lora_config": {"rank": 8}}, "lora_config key.*rank"),
        ({"temperature": 0}, "temperature"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
        ({"report_to": "comet"}, "report_to"),
    ],
)
def test_bad_values_are_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_kwargs(kwargs)


def test_scale_rewards_spellings() -> None:
    assert TrainConfig.from_kwargs({"scale_rewards": True}).scale_rewards == "group"
    assert TrainConfig.from_kwargs({"scale_rewards": "batch"}).scale_rewards == "batch"
    assert TrainConfig.from_kwargs({"max_steps": -1}).max_steps is None


def test_plan_devices() -> None:
    assert plan_devices(0, 0, available=0).training == ()
    plan = plan_devices(3, 1, available=4)
    assert plan.inference == (0,) and plan.training == (1, 2, 3) and not plan.colocated
    assert plan_devices(1, 1, available=1).colocated
    with pytest.raises(ValueError, match="num_training_gpus.*3.*1 CUDA device"):
        plan_devices(3, 1, available=1)
