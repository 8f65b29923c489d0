"""Per-row sampling for the transformers engine: each row of a batch keeps its own parameters.

Pure tensor functions, in the order vLLM applies them: repetition penalty, temperature,
top-k, top-p, then one draw per row from the row's own generator (so a seeded request
reproduces regardless of what it was batched with).

Departures from `transformers.generate`:
1. Sampling parameters are per row, not per call, so concurrent requests with different
   settings share one forward pass.
2. The returned log-probs are those of the distribution that sampled (vLLM's
   `processed_logprobs`); greedy rows report `log_softmax` of the penalised logits.
3. A row whose distribution is not finite gets token 0 and a non-finite log-prob instead of
   raising, so one broken row never fails the rows batched with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowParams:
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    generator: torch.Generator | None


def apply_repetition_penalty(logits: torch.Tensor, seen: list[torch.Tensor], penalties: list[float]) -> torch.Tensor:
    """HF/vLLM rule: divide positive logits of seen tokens by the penalty, multiply negative ones."""
    for i, (ids, p) in enumerate(zip(seen, penalties, strict=True)):
        if p == 1.0:
            continue
        ids = ids.unique()
        vals = logits[i, ids]  # (U,)
        logits[i, ids] = torch.where(vals > 0, vals / p, vals * p)
    return logits


def mask_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf what top-k (k <= 0: off) and top-p (p = 1: off) exclude, row by row."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)  # (B, V)
    k = torch.where(top_k > 0, top_k, vocab).unsqueeze(1)  # (B, 1)
    drop = ranks >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly above each token, (B, V)
    drop |= (before >= top_p.unsqueeze(1)) & (ranks > 0)
    masked = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, masked)


def sample_rows_with_top(
    logits: torch.Tensor, seen: list[torch.Tensor], params: list[RowParams], k: int
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[tuple[int, float], ...]]]:
    """`sample_rows`, plus each row's k most likely (token id, log-prob) under the same distribution (k = 0: none)."""
    tokens, chosen, logprobs = _sample(logits, seen, params)
    if k == 0:
        return tokens, chosen, [() for _ in params]
    top = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)  # (B, k)
    pairs = [tuple(zip(ids, lps, strict=True)) for ids, lps in zip(top.indices.tolist(), top.values.tolist(), strict=True)]
    return tokens, chosen, pairs


def sample_rows(
    logits: torch.Tensor, seen: list[torch.Tensor], params: list[RowParams]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and its log-prob under the sampling distribution: ((B,), (B,))."""
    tokens, chosen, _ = _sample(logits, seen, params)
    return tokens, chosen


def _sample(
    logits: torch.Tensor, seen: list[torch.Tensor], params: list[RowParams]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens (B,), their log-probs (B,), the whole sampling distribution's log-probs (B, V))."""
    logits = apply_repetition_penalty(logits.float().clone(), seen, [p.repetition_penalty for p in params])
    temps = torch.tensor([p.temperature for p in params], device=logits.device)  # (B,)
    greedy = temps == 0
    scaled = logits / torch.where(greedy, 1.0, temps).unsqueeze(1)  # (B, V)
    top_k = torch.tensor([p.top_k for p in params], device=logits.device)
    top_p = torch.tensor([p.top_p for p in params], device=logits.device, dtype=logits.dtype)
    top_k, top_p = torch.where(greedy, 0, top_k), torch.where(greedy, 1.0, top_p)
    truncating = bool(((top_k > 0) | (top_p < 1)).any())  # the sort over the vocabulary is the costly part
    masked = mask_top_k_top_p(scaled, top_k, top_p) if truncating else scaled
    logprobs = masked.log_softmax(dim=-1)  # (B, V)
    finite = torch.isfinite(logprobs.amax(dim=-1))  # (B,) a NaN anywhere in a row makes its max NaN
    drawn = _inverse_cdf(logprobs.nan_to_num(float("-inf")), [p.generator for p in params])
    tokens = torch.where(greedy, masked.argmax(dim=-1), drawn)
    tokens = torch.where(finite, tokens, 0)  # a non-finite row: the caller fails it alone
    return tokens, logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1), logprobs


def _inverse_cdf(logprobs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row from exp(logprobs) (B, V), by one uniform draw per row from the row's generator
    (None: torch's global one) against the row's cumulative distribution, in float64 so the tail keeps its mass.

    Vectorised over rows (a `multinomial` per row was a tenth of a decode step at 18 rows); the token is
    the first whose cumulative mass reaches (1 - u) x total, so u in [0, 1) never picks a zero-mass token."""
    cdf = logprobs.double().exp().cumsum(dim=-1)  # (B, V)
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64, device=g.device if g else cdf.device)
                     for g in generators]).to(cdf.device)  # (B,)
    target = ((1 - u) * cdf[:, -1]).unsqueeze(1)  # (B, 1)
    return torch.searchsorted(cdf, target).squeeze(1).clamp_max(cdf.shape[-1] - 1)
