"""Wrap a base causal LM with a peft LoRA adapter built from `lora_config` (any LoraConfig field)."""

from __future__ import annotations

from typing import Any

import peft


def apply_lora(model, lora_config: dict[str, Any], base_model_name_or_path: str) -> peft.PeftModel:
    """The peft model; `base_model_name_or_path` is what the exported adapter_config.json names."""
    model.config._name_or_path = base_model_name_or_path
    config = peft.LoraConfig(task_type="CAUSAL_LM", **lora_config)
    peft_model = peft.get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = base_model_name_or_path
    return peft_model
