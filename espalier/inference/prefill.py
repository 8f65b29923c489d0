"""Several prompts prefilled in one forward pass, each after its own cached prefix.

Row i holds `reused[i]` cached tokens and `new[i]` tokens to feed. The cached prefixes are
right-aligned at column P = max(reused) (left padding masked), the new tokens left-aligned
after it (right padding masked), so row i's keys and values end up contiguous in columns
`[P - reused[i], P + new[i])`, and its next-token logits are at position `new[i] - 1` of the
pass. Padding queries see at least their row's first token, so no softmax row is empty.

On a 2-core Zen 5, 18 prompts queued together (every run of a GRPO step starts at once; a
400-token shared prefix, 60-111 tokens each of their own) were prefilled in 1.8-2.0 s, the
first alone and the rest in one pass, against 2.6-2.7 s one after another (BENCHMARKS.md,
"versus"). A pass holds at most `PASS_TOKENS` padded new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from espalier.inference.kv import KV, DecodeBatch, GrowingCache, cache_kv

PASS_TOKENS = 2048  # padded new tokens (rows x longest) per pass: bounds its activations and attention mask


def passes(prompts: list[Prompt], budget: int = PASS_TOKENS) -> list[list[int]]:
    """The prompts' indices in arrival order, cut into passes of at most `budget` padded new tokens (a longer
    prompt gets a pass of its own)."""
    parts: list[list[int]] = []
    longest = 0
    for i, p in enumerate(prompts):
        new = len(p.ids) - p.reused
        if parts and (len(parts[-1]) + 1) * max(longest, new) <= budget:
            parts[-1].append(i)
            longest = max(longest, new)
        else:
            parts.append([i])
            longest = new
    return parts


@dataclass(frozen=True)
class Prompt:
    """One prompt to prefill: its ids (L,), and the KV of its first `reused` tokens (None when 0)."""

    ids: torch.Tensor
    reused: int
    prefix: KV | None


@dataclass(frozen=True)
class PaddedPrefill:
    """The inputs of one forward pass over several prompts."""

    ids: torch.Tensor  # (N, S) new tokens, right-padded
    cache: GrowingCache | None  # (N, H, P, D) per layer: the cached prefixes, right-aligned at P (None: P = 0)
    mask: torch.Tensor  # (N, P + S) 1 where a row has a token
    positions: torch.Tensor  # (N, S)
    last: torch.Tensor  # (N,) position in the pass of each row's last prompt token
    width: int  # P

    @classmethod
    def of(cls, prompts: list[Prompt]) -> PaddedPrefill:
        new = [len(p.ids) - p.reused for p in prompts]
        device = prompts[0].ids.device
        ids, fed = (torch.zeros((len(prompts), max(new)), dtype=torch.long, device=device) for _ in range(2))
        for i, (p, n) in enumerate(zip(prompts, new, strict=True)):
            ids[i, :n], fed[i, :n] = p.ids[p.reused :], 1
        reused = torch.tensor([p.reused for p in prompts], device=device)
        positions = reused.unsqueeze(1) + torch.arange(ids.shape[1], device=device)
        last = torch.tensor(new, device=device) - 1
        like = next((p.prefix for p in prompts if p.prefix), None)
        if like is None:
            return cls(ids, None, fed, positions, last, 0)
        rows = DecodeBatch(max_rows=len(prompts))
        for p in prompts:  # each prefix copied once, into buffers with room for the new tokens
            rows.join([p], p.prefix or [(k[:, :, :0], v[:, :, :0]) for k, v in like], fed[:1, :1])
        return cls(ids, rows.cache, torch.cat([rows.mask, fed], dim=1), positions, last, rows.width)

    def row_kv(self, cache: Cache, i: int, prompt: Prompt) -> KV:
        """Row i's keys and values in `cache` after the pass: its prompt's, (1, H, len(ids), D) per layer."""
        start, end = self.width - prompt.reused, self.width + len(prompt.ids) - prompt.reused
        return [(k[i : i + 1, :, start:end], v[i : i + 1, :, start:end]) for k, v in cache_kv(cache)]
