"""Espalier: train the language model inside a DSPy program with GRPO.

    from espalier import ArborGRPO, ArborProvider
    import espalier
    base_url = espalier.init()["base_url"]

Names are imported lazily so that `import espalier` stays cheap (no torch, no dspy) for the
CLI's help and for the server's worker processes.
"""

from __future__ import annotations

import os
from typing import Any

# LiteLLM (under dspy) fetches a model price map from the internet at import; offline that
# costs retries and warnings on every start. Its bundled copy is enough here.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

__version__ = "0.1.0"

_LAZY = {
    "ArborGRPO": "espalier.grpo",
    "ArborProvider": "espalier.program.provider",
    "PrefillChatAdapter": "espalier.program.adapter",
    "FieldwiseChatAdapter": "espalier.program.adapter",
    "init": "espalier.inference.launch",
    "serve": "espalier.inference.launch",
    "TrainConfig": "espalier.config",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'espalier' has no attribute {name!r}")
