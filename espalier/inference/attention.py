"""The transformers engine's attention: SDPA on grouped KV heads, in the KV cache's precision.

transformers' own SDPA path repeats every key and value head for each query head of its
group (`repeat_kv`) whenever an attention mask is passed, which the engine's left-padded
batches always do: a decode step then writes and reads the KV cache several times over
(SmolLM2: 3 KV heads for 9 query heads). Here SDPA gets the grouped heads (`enable_gqa`)
and the mask, so the cache is read once.

Under bf16 autocast (the engine's bf16 prefill) SDPA would cast a cached fp32 prefix to
bf16, and on CPUs the bf16 kernel for short query blocks is several times slower than fp32:
the attention runs in the dtype of the cache it reads, with autocast off.

A decode step (one query per row) is two batched matmuls on the grouped heads instead of
SDPA: on a 2-core Zen 5 CPU, at 18 rows x 650 cached tokens, 0.58 ms against SDPA's 0.99 ms
per layer in fp32 (the engine's cache), and 0.33 ms against 5.2 ms in bf16 (BENCHMARKS.md,
"versus"). Softmax is in fp32; with a bf16 cache the scores would be rounded to bf16 first.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

NAME = "espalier_gqa_sdpa"


def gqa_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
             is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """(B, Hq, Q, D) queries over (B, Hkv, K, D) keys and values; returns (B, Q, Hq, D) and no weights."""
    if query.shape[2] == 1:
        return decode_attention(query, key, value, attention_mask, scaling), None
    causal = query.shape[2] > 1 and attention_mask is None and (is_causal if is_causal is not None else True)
    dtype = key.dtype  # under autocast values can be bf16 while RoPE'd keys are fp32: one dtype for all three
    with torch.autocast(query.device.type, enabled=False):
        out = torch.nn.functional.scaled_dot_product_attention(
            query.to(dtype), key, value.to(dtype),
            attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal,
            enable_gqa=query.shape[1] != key.shape[1],
        )
    return out.transpose(1, 2).contiguous(), None


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float | None = None) -> torch.Tensor:
    """One query per row: (B, Hq, 1, D) over (B, Hkv, K, D) -> (B, 1, Hq, D). Query head h reads KV head
    h // (Hq / Hkv), as `repeat_kv` lays them out; `mask` is SDPA's (True or 0 where a row may attend)."""
    batch, heads, _, dim = query.shape
    groups = heads // key.shape[1]
    scale = dim**-0.5 if scaling is None else scaling
    rows, length = batch * key.shape[1], key.shape[2]
    with torch.autocast(query.device.type, enabled=False):
        # bmm on (B * Hkv, K, D) views: torch.matmul on the 4-d views of a cache with spare columns copied it first
        keys, values = key.reshape(rows, length, dim), value.to(key.dtype).reshape(rows, length, dim)
        q = query.to(key.dtype).reshape(rows, groups, dim).transpose(1, 2)  # (B * Hkv, D, G): head h reads h // G
        if mask is None:
            scores = torch.bmm(keys, q) * scale  # (B * Hkv, K, G)
        else:  # the mask as an additive bias (B, K), added by the matmul itself
            bias = torch.where(mask, 0.0, float("-inf")) if mask.dtype == torch.bool else mask
            bias = bias.to(keys.dtype).reshape(batch, 1, length, 1).expand(batch, key.shape[1], length, 1)
            scores = torch.baddbmm(bias.reshape(rows, length, 1), keys, q, alpha=scale)
        probs = torch.softmax(scores.float(), dim=1).to(key.dtype)  # (B * Hkv, K, G)
        out = torch.bmm(probs.transpose(1, 2), values)  # (B * Hkv, G, D)
    return out.reshape(batch, 1, heads, dim)


def use_gqa_sdpa(model: torch.nn.Module) -> None:
    """Make `model` attend with `gqa_sdpa` (masks built as for SDPA)."""
    AttentionInterface.register(NAME, gqa_sdpa)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(NAME)
