"""The training half of Espalier: GRPO with LoRA on exactly the sampled tokens."""

from espalier.training.trainer import GRPOTrainer

__all__ = ["GRPOTrainer"]
