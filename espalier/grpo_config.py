"""The compiler's own arguments (those of DSPy's GRPO and the recipe), validated once.

`train_kwargs` are validated by `espalier.config.TrainConfig`; this file checks the
arguments around them and the combinations that cannot work, with messages that name the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

CHECKPOINT_MODES = ("single-best", "improvements", "last", "none")
GROUPING_MODES = ("truncate", "fill", "ragged")
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")


@dataclass(frozen=True)
class CompileConfig:
    """`ArborGRPO`'s own arguments, as it was given them (its signature holds the defaults: `from_arguments`)."""

    num_dspy_examples_per_grpo_step: int
    num_rollouts_per_grpo_step: int
    exclude_demos: bool
    num_train_steps: int
    num_threads: int
    use_train_as_val: bool
    num_steps_for_val: int
    report_train_scores: bool
    checkpoint: str
    seed: int
    failure_score: float
    format_failure_score: float
    variably_invoked_predictor_grouping_mode: str
    variably_invoked_predictor_fill_strategy: str | None
    val_temperature: float
    run_dir: str | None

    @classmethod
    def from_arguments(cls, arguments: dict[str, Any]) -> CompileConfig:
        """The config of a call's arguments (`locals()` of `ArborGRPO.__init__`), scores as floats."""
        given = {f.name: arguments[f.name] for f in fields(cls)}
        return cls(**given | {k: float(given[k]) for k in ("failure_score", "format_failure_score")})

    def __post_init__(self) -> None:
        for name in ("num_dspy_examples_per_grpo_step", "num_train_steps", "num_threads", "num_steps_for_val"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_rollouts_per_grpo_step < 2:
            raise ValueError(
                f"num_rollouts_per_grpo_step={self.num_rollouts_per_grpo_step}: GRPO compares runs of the same example, "
                "so it needs at least 2 rollouts per example (the recipe uses 24/6 = 4 per example)"
            )
        if self.checkpoint not in CHECKPOINT_MODES:
            raise ValueError(f"checkpoint={self.checkpoint!r}; use one of {', '.join(CHECKPOINT_MODES)}")
        if self.failure_score <= self.format_failure_score:
            raise ValueError(
                f"failure_score ({self.failure_score}) must be greater than format_failure_score "
                f"({self.format_failure_score}): partial format credit lies between them"
            )
        mode = self.variably_invoked_predictor_grouping_mode
        if mode not in GROUPING_MODES:
            raise ValueError(f"variably_invoked_predictor_grouping_mode={mode!r}; use one of {', '.join(GROUPING_MODES)}")
        if mode == "fill" and self.variably_invoked_predictor_fill_strategy not in ("randint", "max"):
            raise ValueError("grouping mode 'fill' needs variably_invoked_predictor_fill_strategy='randint' or 'max'")
        if self.val_temperature < 0:
            raise ValueError(f"val_temperature must be >= 0 (0 = greedy), got {self.val_temperature}")


SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0}


def resolve_sampling(lm_kwargs: dict[str, Any], train_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The one set of rollout sampling settings that both the engine and the trainer use.

    Each is train_kwargs' value, else the LM's, else the OpenAI default (temperature 1.0, no
    top_p / top_k, no repetition penalty); where both are set they must agree."""
    settings = dict(SAMPLING_DEFAULTS)
    for key in SAMPLING_KEYS:
        lm_value, train_value = lm_kwargs.get(key), train_kwargs.get(key)
        if lm_value is not None and train_value is not None and float(lm_value) != float(train_value):
            raise ValueError(
                f"{key} disagrees: the LM samples with {key}={lm_value} but train_kwargs say {key}={train_value}; "
                "log-probs must use the sampling settings, so set the same value in both"
            )
        value = train_value if train_value is not None else lm_value
        if value is not None:
            settings[key] = value
    return settings
