"""Per-row sampling: hand-computed masks, penalties and log-probs."""

from __future__ import annotations

import math

import torch

from espalier.inference.sampling import RowParams, apply_repetition_penalty, mask_top_k_top_p, sample_rows

INF = float("-inf")


def test_top_k_and_top_p_masks_per_row():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    out = mask_top_k_top_p(logits, torch.tensor([2, 0, 0]), torch.tensor([1.0, 0.7, 1.0]))
    assert torch.isinf(out[0, 2:]).all() and torch.isfinite(out[0, :2]).all()  # top-2
    assert torch.isinf(out[1, 2:]).all() and torch.isfinite(out[1, :2]).all()  # 0.5 + 0.3 >= 0.7
    assert torch.equal(out[2], logits[2])  # both off


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits.clone(), [torch.tensor([0, 1, 1])], [2.0])
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_logprobs_are_at_the_sampling_temperature_and_greedy_is_argmax():
    logits = torch.tensor([[1.0, 2.0, 0.0], [1.0, 2.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    params = [RowParams(0.0, 1.0, -1, 1.0, None), RowParams(0.5, 1.0, -1, 1.0, gen)]
    tokens, logprobs = sample_rows(logits, [torch.tensor([0]), torch.tensor([0])], params)
    assert tokens[0] == 1
    assert math.isclose(logprobs[0], torch.log_softmax(logits[0], -1)[1].item(), rel_tol=1e-6)
    expected = torch.log_softmax(logits[1] / 0.5, -1)[tokens[1]].item()
    assert math.isclose(logprobs[1], expected, rel_tol=1e-6)


def test_seeded_rows_reproduce_whatever_they_are_batched_with():
    logits = torch.randn(3, 50)
    a = sample_rows(logits, [torch.tensor([0])] * 3,
                    [RowParams(1.0, 1.0, -1, 1.0, torch.Generator().manual_seed(s)) for s in (1, 2, 3)])[0]
    b = sample_rows(logits[1:2], [torch.tensor([0])], [RowParams(1.0, 1.0, -1, 1.0, torch.Generator().manual_seed(2))])[0]
    assert a[1] == b[0]


def test_a_row_with_a_broken_distribution_does_not_stop_the_others():
    """A decode step where one row's logits overflowed: it gets a non-finite log-prob, the others sample."""
    logits = torch.randn(3, 50)
    logits[1, 7] = float("nan")
    logits[2] = float("inf")
    params = [RowParams(1.0, 1.0, -1, 1.0, torch.Generator().manual_seed(s)) for s in (1, 2, 3)]
    tokens, logprobs = sample_rows(logits, [torch.tensor([0])] * 3, params)
    alone = sample_rows(logits[:1], [torch.tensor([0])], [RowParams(1.0, 1.0, -1, 1.0, torch.Generator().manual_seed(1))])
    assert tokens[0] == alone[0][0] and math.isfinite(logprobs[0])
    assert not math.isfinite(logprobs[1]) and not math.isfinite(logprobs[2])


def test_draws_follow_the_sampling_distribution_and_never_pick_what_top_k_removed():
    """20,000 rows of one distribution (p = .5, .3, .15, .05, then tokens top-k 4 removes): each token's
    share within 4 standard errors of its probability, a removed token never drawn."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0, 0.0])
    logits = torch.log(probs + 1e-3).expand(20_000, -1).clone()  # tokens 4, 5 only top-k removes
    params = [RowParams(1.0, 1.0, 4, 1.0, None)] * len(logits)
    torch.manual_seed(0)
    tokens, _ = sample_rows(logits, [torch.tensor([0])] * len(logits), params)
    shares = torch.bincount(tokens, minlength=6).double() / len(tokens)
    kept = (probs + 1e-3)[:4] / (probs + 1e-3)[:4].sum()
    assert shares[4] == shares[5] == 0
    assert torch.all((shares[:4] - kept).abs() < 4 * torch.sqrt(kept * (1 - kept) / len(tokens)))
