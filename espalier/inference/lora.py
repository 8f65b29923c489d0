"""LoRA adapters merged into the served weights, so that a policy costs what the base model costs.

A peft adapter directory (adapter_config.json + adapter_model.safetensors) is read into
per-module factors; serving it means running the model with W = W0 + scale * B @ A in every
target Linear. `WeightSets` keeps the base weights W0 and the merged weights of the adapters
used most recently, and puts one set in place by re-pointing each Linear's `weight` (no copy),
so switching between the base model, the policy and a checkpoint between decode steps is cheap,
and a reloaded adapter is merged afresh from W0 (it replaces the previous merge, never adds to it).

Departures from peft / Arbor:
1. No LoRA kernels run per token: on 2 CPU cores peft's unmerged layers made the
   policy several times slower than the base model (BENCHMARKS.md, "merged adapter").
2. Plain LoRA only (Linear targets, no DoRA, no `modules_to_save`, no LoRA bias): anything
   else is refused with a pointer to `--engine vllm`.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LoraFactors:
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scale: float

    def delta(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.b.float() @ self.a.float() * self.scale).to(dtype)  # (out, in)


def read_adapter(path: Path) -> dict[str, LoraFactors]:
    """Module name (as in `model.named_modules()`) -> its LoRA factors, from a peft adapter directory."""
    from safetensors.torch import load_file

    path = Path(path)
    config = json.loads((path / "adapter_config.json").read_text())
    _require_plain_lora(config)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"{path}: unexpected tensor {key!r} in a LoRA adapter; use --engine vllm for it")
        parts.setdefault(m["module"], {})[m["ab"]] = tensor
    factors = {}
    for module, ab in parts.items():
        rank = ab["A"].shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        factors[module] = LoraFactors(ab["A"], ab["B"], float(scale))
    return factors


def _require_plain_lora(config: dict) -> None:
    unsupported = {
        "peft_type": config.get("peft_type", "LORA") != "LORA",
        "use_dora": bool(config.get("use_dora")),
        "modules_to_save": bool(config.get("modules_to_save")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "lora_bias": bool(config.get("lora_bias")),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"the transformers engine serves plain LoRA adapters only (this one sets {bad}); "
                         "use --engine vllm for it")


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    """peft's rank/alpha pattern rule: a key matches a module name or its dotted suffix."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


class WeightSets:
    """The base weights of a model's Linears and the merged weights of up to `keep` adapters, each set also
    held in `low` precision (bf16 by default), made on first use.

    `low_only` (an engine that never computes in full precision): an adapter's full-precision merge is dropped
    once its low copy is made, and `use` always puts low copies in place: for SmolLM2-135M, 424 MB less per
    adapter held."""

    def __init__(self, model: torch.nn.Module, keep: int = 2, low: torch.dtype = torch.bfloat16,
                 full_precision: tuple[str, ...] = (), low_only: bool = False) -> None:
        self.modules = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        self.base = {name: m.weight for name, m in self.modules.items()}  # W0, never written
        self.keep, self.low, self.full_precision, self.low_only = keep, low, set(full_precision), low_only
        self._merged: OrderedDict[str, dict[str, torch.nn.Parameter]] = OrderedDict()
        self._low: OrderedDict[str | None, dict[str, torch.nn.Parameter]] = OrderedDict()
        self.merges = 0

    def use(self, adapter: str | None, factors: dict[str, LoraFactors] | None, low: bool = False) -> None:
        """Put the weights of `adapter` (None: the base model) in place, merging them first if not held;
        `low` (always, when `low_only`): their low-precision copies (except the `full_precision` modules, e.g.
        the LM head)."""
        if low or self.low_only:
            weights = self._low_for(adapter, factors)
        else:
            weights = self.base if adapter is None else self._merged_for(adapter, factors)
        for name, module in self.modules.items():
            module._parameters["weight"] = weights.get(name, self.base[name])

    def forget(self, adapter: str) -> None:
        """Drop an adapter's merged weights (it was unloaded or is about to be replaced)."""
        self._merged.pop(adapter, None)
        self._low.pop(adapter, None)

    def _low_for(self, adapter: str | None, factors: dict[str, LoraFactors] | None) -> dict[str, torch.nn.Parameter]:
        if adapter in self._low:
            self._low.move_to_end(adapter)
            return self._low[adapter]
        weights = self.base if adapter is None else self._merged_for(adapter, factors)
        with torch.no_grad():
            low = {name: torch.nn.Parameter(w if name in self.full_precision else w.to(self.low),
                                            requires_grad=False)
                   for name, w in {**self.base, **weights}.items()}
        if self.low_only and adapter is not None:
            self._merged.pop(adapter, None)
        self._low[adapter] = low
        while sum(a is not None for a in self._low) > self.keep:  # the base's set stays
            self.forget(next(a for a in self._low if a is not None))
        return low

    def _merged_for(self, adapter: str, factors: dict[str, LoraFactors]) -> dict[str, torch.nn.Parameter]:
        if adapter in self._merged:
            self._merged.move_to_end(adapter)
            return self._merged[adapter]
        while len(self._merged) >= self.keep:
            self.forget(next(iter(self._merged)))
        missing = sorted(set(factors) - set(self.modules))
        if missing:
            raise ValueError(f"the adapter targets modules the model lacks or that are not Linear: {missing[:3]}")
        merged = {}
        with torch.no_grad():
            for name, f in factors.items():
                w0 = self.base[name]
                merged[name] = torch.nn.Parameter(w0 + f.delta(w0.dtype), requires_grad=False)  # (out, in)
        self._merged[adapter] = merged
        self.merges += 1
        return merged
