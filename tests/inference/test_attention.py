"""The engine's attention (grouped KV heads, no repeat) computes what transformers' eager attention does."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from espalier.inference.attention import NAME, use_gqa_sdpa


def logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask).logits


def test_grouped_heads_with_left_padding_match_eager_attention(tiny_chat_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, attn_implementation="eager").eval()
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped: the case repeat_kv copies
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = mask[2, :9] = 0  # left padding, as in the engine's batches
    want = logits(model, ids, mask)
    use_gqa_sdpa(model)
    assert model.config._attn_implementation == NAME
    got = logits(model, ids, mask)
    valid = mask.bool()
    assert torch.allclose(got[valid], want[valid], atol=1e-5)


def test_a_decode_step_over_a_cache_matches_eager_attention(tiny_chat_dir):
    eager = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, attn_implementation="eager").eval()
    grouped = AutoModelForCausalLM.from_pretrained(tiny_chat_dir).eval()
    use_gqa_sdpa(grouped)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, eager.config.vocab_size, (2, 10), generator=g)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, :4] = 0
    steps = []
    for model in (eager, grouped):
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask[:, :10], use_cache=True)
            nxt = model(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=out.past_key_values,
                        position_ids=mask.sum(-1, keepdim=True) - 1, use_cache=True)
        steps.append(nxt.logits[:, -1])
    assert torch.allclose(steps[0], steps[1], atol=1e-5)


def test_attention_runs_in_the_cache_precision_under_bf16_autocast(tiny_chat_dir):
    """Inside bf16 autocast an fp32 cache is read in fp32 (no per-step cast): the output is fp32."""
    from espalier.inference.attention import gqa_sdpa

    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir).eval()
    layer = model.model.layers[0].self_attn
    q = torch.randn(2, 4, 1, 16, dtype=torch.bfloat16)
    k, v = torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = gqa_sdpa(layer, q, k, v, None)
    assert out.dtype == torch.float32 and out.shape == (2, 1, 4, 16)
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    assert torch.allclose(out, want.transpose(1, 2), atol=1e-6)


def test_decode_attention_over_a_padded_cache_view_matches_sdpa():
    """A decode step reads a cache with spare columns (a view) and left padding, with a boolean or an additive
    mask: the same as SDPA on repeated heads in fp32; a bf16 cache stays within bf16 rounding."""
    from espalier.inference.attention import decode_attention

    g = torch.Generator().manual_seed(2)
    q = torch.randn(3, 6, 1, 16, generator=g)
    k_buf, v_buf = torch.randn(3, 2, 20, 16, generator=g), torch.randn(3, 2, 20, 16, generator=g)
    k, v = k_buf[:, :, :9], v_buf[:, :, :9]  # 9 filled columns of 20
    allowed = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    allowed[1, ..., :4] = allowed[2, ..., :7] = False  # left padding
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=allowed).transpose(1, 2)
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    for mask in (allowed, additive):
        assert torch.allclose(decode_attention(q, k, v, mask), want, atol=1e-6)
    low = decode_attention(q, k.bfloat16(), v.bfloat16(), allowed)
    assert low.dtype == torch.bfloat16 and torch.allclose(low.float(), want, atol=3e-2)
