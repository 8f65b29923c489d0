"""GRPO losses: a per-token clipped objective, then one of four reductions picked by `loss_type`.

Every reduction is defined on a whole optimizer batch and returns one micro-batch's share, so
that summing the shares over all micro-batches of all processes gives the optimizer batch's
loss (the trainer sums gradients over micro-batches and over processes, never averages):

    grpo     sum_i mean_t(l_it) / N              per-sequence mean, then mean over the N sequences
    bnpo     sum_t l_t / T_micro / M              token mean of each micro-batch, mean over the M micro-batches
    dr_grpo  sum_it l_it / (L * N)                sum over a fixed length L, divided by L x N sequences
    dapo     sum_it l_it / T                      token mean over the T completion tokens of the optimizer batch

with l_it = -w_it min(rho_it A_i, clip(rho_it, 1 - eps, 1 + eps_high) A_i) + beta * KL_it,
rho = exp(logp - logp_old), KL_it = exp(ref - logp) - (ref - logp) - 1 (the k3 estimator), and
w_it = min(exp(logp_old - logp_sampler), cap) the truncated importance-sampling weight (1 when
the correction is off or the sampler gave no log-prob).

Departures from the paper / TRL / Arbor:
1. grpo, dr_grpo and dapo do not depend on how the optimizer batch is cut into micro-batches
   or processes (TRL divides each micro-batch's loss by gradient_accumulation_steps, which is
   only equal when micro-batches are full). bnpo is defined per micro-batch, so it does.
2. dapo's token count is the optimizer batch's (over all processes), not an estimate.
3. Completion tokens only: the mask never covers a prompt token (Arbor's mask does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class Normalizer:
    """Counts of the whole optimizer batch, over all processes."""

    num_sequences: int
    num_tokens: int  # completion tokens
    num_micro_batches: int
    fixed_length: int  # dr_grpo's L: max_completion_length, else the batch's longest completion


class TokenLoss(NamedTuple):
    loss: torch.Tensor  # (B, T) per-token loss, not yet masked
    ratio: torch.Tensor  # (B, T) importance ratio rho
    kl: torch.Tensor  # (B, T) k3 estimate, zeros when there is no reference


def token_loss(
    logp: torch.Tensor,  # (B, T) current policy log-probs of the completion tokens
    old_logp: torch.Tensor,  # (B, T) log-probs under the policy that sampled
    advantages: torch.Tensor,  # (B,)
    epsilon: float,
    epsilon_high: float,
    ref_logp: torch.Tensor | None = None,  # (B, T) adapter-free log-probs, only when beta > 0
    beta: float = 0.0,
    weight: torch.Tensor | None = None,  # (B, T) detached TIS weights, None = 1
) -> TokenLoss:
    """The clipped surrogate (weighted, plus beta * KL) for every completion token."""
    ratio = torch.exp(logp - old_logp)  # (B, T)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)  # (B, T)
    adv = advantages.unsqueeze(1)  # (B, 1)
    loss = -torch.min(ratio * adv, clipped * adv)  # (B, T)
    if weight is not None:
        loss = loss * weight
    if ref_logp is None:
        return TokenLoss(loss, ratio, torch.zeros_like(loss))
    delta = ref_logp - logp  # (B, T)
    kl = torch.exp(delta) - delta - 1  # (B, T)
    return TokenLoss(loss + beta * kl, ratio, kl)


class Correction(NamedTuple):
    weight: torch.Tensor  # (B, T) detached TIS weight; 1 where the sampler gave no log-prob
    counts: list[float]  # tokens with a sampler log-prob, sum |gap|, tokens with |gap| > 0.1, weights capped


MISMATCH_THRESHOLD = 0.1  # nats: the sampler's and the trainer's probability differ by more than ~10%


def sampling_correction(
    old_logp: torch.Tensor,  # (B, T) the trainer's log-probs of the policy that sampled
    sampler_logp: torch.Tensor,  # (B, T) the engine's sampling log-probs (anything where absent)
    present: torch.Tensor,  # (B, T) 1 on completion tokens that have a sampler log-prob
    cap: float | None,  # None: no correction, weights 1 (the gap is still measured)
) -> Correction:
    """Truncated importance sampling between the sampler and the trainer (verl / TRL's TIS)."""
    has = present.bool()  # (B, T)
    gap = torch.where(has, old_logp.detach() - sampler_logp, torch.zeros_like(old_logp))  # (B, T)
    raw = torch.exp(gap)  # (B, T)
    weight = torch.ones_like(raw) if cap is None else torch.where(has, raw.clamp(max=cap), torch.ones_like(raw))
    capped = 0.0 if cap is None else ((raw > cap) & has).sum().item()
    counts = [has.sum().item(), gap.abs().sum().item(), ((gap.abs() > MISMATCH_THRESHOLD) & has).sum().item(), capped]
    return Correction(weight, [float(c) for c in counts])


def grpo_loss(loss: torch.Tensor, mask: torch.Tensor, norm: Normalizer) -> torch.Tensor:
    per_sequence = (loss * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B,)
    return per_sequence.sum() / norm.num_sequences


def bnpo_loss(loss: torch.Tensor, mask: torch.Tensor, norm: Normalizer) -> torch.Tensor:
    return (loss * mask).sum() / mask.sum().clamp(min=1) / norm.num_micro_batches


def dr_grpo_loss(loss: torch.Tensor, mask: torch.Tensor, norm: Normalizer) -> torch.Tensor:
    return (loss * mask).sum() / (norm.fixed_length * norm.num_sequences)


def dapo_loss(loss: torch.Tensor, mask: torch.Tensor, norm: Normalizer) -> torch.Tensor:
    return (loss * mask).sum() / norm.num_tokens


REDUCTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, Normalizer], torch.Tensor]] = {
    "grpo": grpo_loss,
    "bnpo": bnpo_loss,
    "dr_grpo": dr_grpo_loss,
    "dapo": dapo_loss,
}


def clip_fractions(
    ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon: float, epsilon_high: float
):
    """Counts of tokens whose ratio was clipped below (A < 0) and above (A > 0), as in TRL."""
    adv = advantages.unsqueeze(1)  # (B, 1)
    low = (ratio < 1 - epsilon) & (adv < 0) & mask.bool()  # (B, T)
    high = (ratio > 1 + epsilon_high) & (adv > 0) & mask.bool()  # (B, T)
    return low.sum().item(), high.sum().item()


def selective_log_softmax(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[ids] without materialising the (B, T, V) log-prob tensor twice."""
    logits = logits.float()  # (B, T, V), fp32 even under bf16 autocast
    picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)  # (B, T)
