"""The compiler's arguments: impossible combinations fail at construction with the fix named."""

import pytest

from espalier.grpo import ArborGRPO
from espalier.grpo_config import resolve_sampling


def _metric(example, pred, trace=None):
    return 1.0


def _make(**kw):
    args = dict(metric=_metric, num_dspy_examples_per_grpo_step=2, num_rollouts_per_grpo_step=4)
    return ArborGRPO(**{**args, **kw})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_rollouts_per_grpo_step": 1}, "at least 2 rollouts"),
        ({"checkpoint": "best"}, "single-best, improvements, last, none"),
        ({"failure_score": -1, "format_failure_score": 0}, "must be greater than format_failure_score"),
        ({"variably_invoked_predictor_grouping_mode": "fill"}, "fill_strategy"),
        ({"train_kwargs": {"learning_rte": 1e-5}}, "known keys are"),
        ({"train_kwargs": {"gradient_accumulation_steps": 2.5}}, "whole number"),
        ({"metric": None}, "needs a metric"),
        ({"multitask": False}, "not supported"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _make(**kwargs)


def test_recipe_accumulation_spelling_is_accepted():
    assert _make(train_kwargs={"gradient_accumulation_steps": 24 / 6}).train_config.gradient_accumulation_steps == 4


def test_sampling_settings_must_agree_with_the_lm():
    with pytest.raises(ValueError, match="temperature disagrees"):
        resolve_sampling({"temperature": 0.7}, {"temperature": 1.0})
    merged = resolve_sampling({"temperature": 1.0, "top_k": -1}, {"temperature": 1.0, "top_p": 0.9})
    assert merged == {"temperature": 1.0, "top_p": 0.9, "top_k": -1, "repetition_penalty": 1.0}
    # One source is enough: the LM's temperature alone is the trainer's temperature too.
    assert resolve_sampling({"temperature": 0.7}, {})["temperature"] == 0.7


def test_single_best_without_validation_data_is_an_error():
    import dspy

    with pytest.raises(ValueError, match="no valset"):
        _make()._validation_set([dspy.Example(claim="x")], None)
