"""Shared fixtures: tiny random Llama models written once per session, threads kept low."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from espalier.models import tiny_llama

torch.set_num_threads(1)  # the CI machine is small and shared; tiny models gain nothing from threads


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama-style model (vocab 64, hidden 32, 2 layers), no tokenizer; for trainer tests."""
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"), vocab_size=64, hidden_size=32, num_layers=2, seed=0)


@pytest.fixture(scope="session")
def tiny_llama_factory(tmp_path_factory: pytest.TempPathFactory):
    """Build (and cache per arguments) tiny models: `tiny_llama_factory(vocab_size=16, hidden_size=64)`."""
    made: dict[tuple, Path] = {}

    def make(**kwargs) -> Path:
        key = tuple(sorted(kwargs.items()))
        if key not in made:
            made[key] = tiny_llama(tmp_path_factory.mktemp("tiny-llama"), **kwargs)
        return made[key]

    return make
