"""The transformers engine's attention: SDPA on grouped KV heads, in the KV cache's precision.

transformers' own SDPA path repeats every key and value head for each query head of its
group (`repeat_kv`) whenever an attention mask is passed, which the engine's left-padded
batches always do: a decode step then writes and reads the KV cache several times over
(SmolLM2: 3 KV heads for 9 query heads). Here SDPA gets the grouped heads (`enable_gqa`)
and the mask, so the cache is read once.

Under bf16 autocast (the engine's bf16 prefill) SDPA would cast a cached fp32 prefix to
bf16, and on CPUs the bf16 kernel for short query blocks is several times slower than fp32:
the attention runs in the dtype of the cache it reads, with autocast off.
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
    causal = query.shape[2] > 1 and attention_mask is None and (is_causal if is_causal is not None else True)
    dtype = key.dtype  # under autocast values can be bf16 while RoPE'd keys are fp32: one dtype for all three
    with torch.autocast(query.device.type, enabled=False):
        out = torch.nn.functional.scaled_dot_product_attention(
            query.to(dtype), key, value.to(dtype),
            attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal,
            enable_gqa=query.shape[1] != key.shape[1],
        )
    return out.transpose(1, 2).contiguous(), None


def use_gqa_sdpa(model: torch.nn.Module) -> None:
    """Make `model` attend with `gqa_sdpa` (masks built as for SDPA)."""
    AttentionInterface.register(NAME, gqa_sdpa)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(NAME)
