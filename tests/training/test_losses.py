"""Each loss type against values computed by hand on a fixed 2 x 3 batch."""

from __future__ import annotations

import math

import pytest
import torch

from espalier.training.losses import REDUCTIONS, Normalizer, clip_fractions, selective_log_softmax, token_loss

EPS, EPS_HIGH = 0.2, 0.28
LOGP = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.2, -3.0]])
OLD = torch.tensor([[-1.1, -1.5, -0.9], [-1.0, -0.2, -3.5]])
ADV = torch.tensor([1.0, -0.5])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
# This micro-batch is half of an optimizer batch of 4 sequences, 10 completion tokens, 2 micro-batches.
NORM = Normalizer(num_sequences=4, num_tokens=10, num_micro_batches=2, fixed_length=4)

# Per-token loss -min(r A, clip(r) A) by hand, r = exp(logp - old):
L00 = -math.exp(0.1)  # r = 1.105 inside [0.8, 1.28], A = 1
L01 = -math.exp(-0.5)  # r = 0.607 < 0.8 but A > 0: min keeps the unclipped r A
L02 = -1.28  # r = exp(0.4) = 1.492 > 1.28, A = 1: clipped high
L10 = -(0.8 * -0.5)  # r = 0.607, A = -0.5: min(-0.303, -0.4) = -0.4, clipped low
L11 = -(1.0 * -0.5)  # r = 1
ROW0, ROW1 = L00 + L01 + L02, L10 + L11  # row 1's third token is padding
HAND = {
    "grpo": (ROW0 / 3 + ROW1 / 2) / 4,  # per-sequence means, / 4 sequences of the optimizer batch
    "bnpo": (ROW0 + ROW1) / 5 / 2,  # token mean of this micro-batch, / 2 micro-batches
    "dr_grpo": (ROW0 + ROW1) / (4 * 4),  # sum / (fixed length 4 x 4 sequences)
    "dapo": (ROW0 + ROW1) / 10,  # sum / 10 tokens of the optimizer batch
}


@pytest.mark.parametrize("loss_type", sorted(HAND))
def test_each_loss_matches_hand_computation(loss_type: str) -> None:
    terms = token_loss(LOGP, OLD, ADV, EPS, EPS_HIGH)
    assert REDUCTIONS[loss_type](terms.loss, MASK, NORM).item() == pytest.approx(HAND[loss_type], abs=1e-6)


def test_kl_term_is_k3_to_the_reference() -> None:
    ref = torch.tensor([[-1.2, -2.0, -0.1], [-1.5, -0.7, -3.0]])
    beta = 0.04
    terms = token_loss(LOGP, OLD, ADV, EPS, EPS_HIGH, ref_logp=ref, beta=beta)
    k3 = [math.exp(-0.2) + 0.2 - 1, 0.0, math.exp(0.4) - 0.4 - 1, 0.0, math.exp(-0.5) + 0.5 - 1]  # exp(d) - d - 1
    masked_kl = (terms.kl * MASK)[MASK.bool()].tolist()
    assert masked_kl == pytest.approx(k3, abs=1e-6)
    dapo = REDUCTIONS["dapo"](terms.loss, MASK, NORM).item()
    assert dapo == pytest.approx((ROW0 + ROW1 + beta * sum(k3)) / 10, abs=1e-6)


def test_clip_counts() -> None:
    terms = token_loss(LOGP, OLD, ADV, EPS, EPS_HIGH)
    assert clip_fractions(terms.ratio, ADV, MASK, EPS, EPS_HIGH) == (1, 1)  # (1, 0) low, (0, 2) high


def test_padding_tokens_do_not_change_any_loss() -> None:
    other = LOGP.clone()
    other[1, 2] = -9.0  # a padded position
    for reduce in REDUCTIONS.values():
        a = reduce(token_loss(LOGP, OLD, ADV, EPS, EPS_HIGH).loss, MASK, NORM)
        b = reduce(token_loss(other, OLD, ADV, EPS, EPS_HIGH).loss, MASK, NORM)
        assert a.item() == b.item()


def test_selective_log_softmax() -> None:
    logits = torch.tensor([[[0.0, math.log(3.0)], [1.0, 1.0]]])  # (1, 2, 2)
    ids = torch.tensor([[1, 0]])
    assert selective_log_softmax(logits, ids).tolist()[0] == pytest.approx([math.log(3 / 4), math.log(1 / 2)])
