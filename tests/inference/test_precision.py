"""bf16 is chosen by measurement: the engine's prefill and the recipe's `bf16` follow `fast_bf16`."""

import math

from espalier.precision import MARGIN, bf16_speedup, fast_bf16


def test_cpu_bf16_is_chosen_only_when_measured_faster():
    speedup = bf16_speedup("cpu")
    assert math.isfinite(speedup) and speedup > 0
    assert fast_bf16("cpu") == (speedup >= MARGIN)
    assert fast_bf16("meta") is False  # a device that cannot be timed never gets bf16


def test_the_engine_and_the_recipe_default_to_the_measured_choice(tiny_chat_dir):
    from espalier.inference.hf_engine import TransformersEngine
    from espalier.recipes.multihop.job import RunOptions, train_kwargs_for

    engine = TransformersEngine(tiny_chat_dir)
    try:
        assert engine.prefill_bf16 == fast_bf16("cpu")
    finally:
        engine.close()
    assert train_kwargs_for(RunOptions())["bf16"] == fast_bf16("cpu")
