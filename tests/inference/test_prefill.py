"""How the transformers engine cuts prompts that wait together into forward passes."""

import torch

from espalier.inference.prefill import Prompt, passes


def prompt(new: int, reused: int = 0) -> Prompt:
    return Prompt(torch.zeros(reused + new, dtype=torch.long), reused, None)


def test_passes_keep_arrival_order_and_bound_the_padded_new_tokens():
    # rows x longest new prompt <= 60; the cached prefix (reused) costs nothing here
    assert passes([prompt(10), prompt(10, reused=500), prompt(30), prompt(5)], budget=60) == [[0, 1], [2, 3]]
    assert passes([prompt(10), prompt(25), prompt(25)], budget=60) == [[0, 1], [2]]
    assert passes([prompt(100), prompt(1), prompt(1)], budget=60) == [[0], [1, 2]]  # a long prompt passes alone
    assert passes([prompt(7)] * 9, budget=60) == [list(range(8)), [8]]
