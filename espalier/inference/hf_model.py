"""The transformers engine's view of its model: what it can serve, its EOS ids, and a faster LM head.

`PackedHead` computes the LM head's logits in fp32 from a weight packed once for oneDNN
(`torch.ops.mkldnn._reorder_linear_weight`, the op behind torch.compile's CPU linears): an
unpacked fp32 linear re-lays its weight out on every call. For SmolLM2-135M's head (49,152 x
576), 8 rows: 2.4 ms against 11.9 ms, a decode step of 8 rows 62 against 76 ms (BENCHMARKS.md,
"versus"); logits agree with the plain head to ~1e-5. Where oneDNN is missing (non-x86 builds,
CUDA) the head is called as it is.
"""

from __future__ import annotations

import contextlib

import torch

from espalier.inference.engine import EngineError

PACK_ROWS = 16  # the batch size oneDNN lays the packed weight out for; 8 to 32 rows ran alike


class PackedHead:
    """`head(hidden)` for the weight currently in place, repacked when that weight changes (an adapter that
    targets the head): one packed copy is held."""

    def __init__(self, head: torch.nn.Linear) -> None:
        self.head = head
        self._weight: torch.Tensor | None = None
        self._packed: torch.Tensor | None = None
        self.enabled = head.weight.device.type == "cpu" and torch.backends.mkldnn.is_available()

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, hidden) -> (B, V) logits in the head's dtype."""
        if not self.enabled or hidden.dtype != self.head.weight.dtype:
            return self.head(hidden)
        weight = self.head.weight
        if weight is not self._weight:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)
            self._weight = weight
        return torch.ops.mkldnn._linear_pointwise(hidden, self._packed, self.head.bias, "none", [], "")


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's threads for one forward pass (None, the default: as they are). On an idle 2-core CPU two threads
    made an 18-row decode step 2.1x faster than one; on a loaded one, where each step waits for the slower
    thread, one can be faster."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def head_names(model) -> tuple[str, ...]:
    head = model.get_output_embeddings()
    return tuple(name for name, m in model.named_modules() if m is head)


def plain_head(model) -> bool:
    """Whether logits are the LM head of the decoder's last hidden state and nothing more (no soft-capping or
    scaling), so that the engine may run the two apart."""
    text = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    scaled = [k for k in ("final_logit_softcapping", "logit_scale", "logits_scaling") if getattr(text, k, None)]
    return not scaled and isinstance(model.get_output_embeddings(), torch.nn.Linear)


def require_full_attention(config) -> None:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types = set(getattr(text, "layer_types", None) or ["full_attention"])
    windowed = getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True) is not False
    sliding = bool(windowed) or bool(types - {"full_attention"})
    if sliding:
        raise EngineError(
            f"the transformers engine serves full-attention models only; {config.model_type} has sliding-window "
            "layers. Use --engine vllm (engine='vllm') for it."
        )


def eos_ids(model, tokenizer) -> tuple[int, ...]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the model has no EOS token id")
    return tuple(dict.fromkeys(ids))
