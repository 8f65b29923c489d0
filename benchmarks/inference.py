"""Inference throughput and adapter swap latency: vLLM engine vs transformers engine vs plain HF `generate`.

    python benchmarks/inference.py [--quick] [--out results.json] [--model ID_OR_DIR] [--engines vllm,transformers,hf]

For each engine: generated tokens/s for N concurrent chat requests (24 by default; each
request is its own thread calling `engine.generate`, with the chat template applied as the
server does), and the time to publish a new LoRA adapter as the current policy (median over
several swaps). Plain HF `generate` gets the same prompts as one left-padded batch and has
no adapter swap. Prints a Markdown table; writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from espalier.inference.chat import prompt_ids
from espalier.inference.engine import GenerateRequest
from espalier.inference.serving import ServedModel

TOPICS = [
    "photosynthesis",
    "the French revolution",
    "prime numbers",
    "volcanoes",
    "the moon",
    "jazz",
    "bicycles",
    "glaciers",
    "the printing press",
    "honey bees",
    "tides",
    "chess",
]


def prompts(tokenizer, n: int) -> list[list[int]]:
    return [
        prompt_ids(tokenizer, [{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]} ({i})."}])
        for i in range(n)
    ]


def make_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """The recipe's LoRA shape (r=8 on every projection), small random weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"],
    )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.01)
    model.save_pretrained(out)
    return out


def engine_throughput(engine, ids: list[list[int]], max_tokens: int) -> dict[str, float]:
    requests = [GenerateRequest(tuple(p), max_tokens=max_tokens, temperature=1.0, seed=i) for i, p in enumerate(ids)]
    engine.generate(requests[0], timeout=600)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(lambda r: engine.generate(r, timeout=1800), requests))
    seconds = time.perf_counter() - start
    tokens = sum(len(s.token_ids) for seqs in results for s in seqs)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def swap_latency(engine, model_dir: Path, swaps: int, workdir: Path) -> dict[str, float]:
    served = ServedModel(engine, "bench")
    adapters = [make_adapter(model_dir, workdir / f"adapter-{i}", seed=i) for i in range(swaps)]
    times = [served.publish(a) for a in adapters]
    return {"swap_ms_median": statistics.median(times), "swap_ms_max": max(times)}


def load_hf(model_dir: Path):
    """The plain transformers model and tokenizer that `hf_generate` uses (fp32, eval)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), tokenizer


def hf_generate(model_dir: Path, ids: list[list[int]], max_tokens: int, loaded=None,
                temperature: float = 1.0) -> dict[str, float]:
    """Tokens/s of one left-padded batch through `generate`; `loaded` = `load_hf(model_dir)` to reuse a model."""
    model, tokenizer = loaded or load_hf(model_dir)
    width = max(len(p) for p in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in ids])  # (B, L) left-padded
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])  # (B, L)
    kwargs = dict(
        attention_mask=mask, max_new_tokens=max_tokens, do_sample=True, temperature=temperature, top_k=0,
        pad_token_id=pad,
    )
    with torch.inference_mode():
        model.generate(input_ids[:1], **{**kwargs, "attention_mask": mask[:1], "max_new_tokens": 4})  # warm-up
        start = time.perf_counter()
        out = model.generate(input_ids, **kwargs)[:, width:]  # (B, T)
        seconds = time.perf_counter() - start
    eos = set(
        model.generation_config.eos_token_id
        if isinstance(model.generation_config.eos_token_id, list)
        else [model.generation_config.eos_token_id]
    )
    tokens = 0
    for row in out.tolist():
        for t in row:
            tokens += 1
            if t in eos:
                break
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    from espalier.inference.factory import resolve_model_path

    model_dir = resolve_model_path(args.model)
    n, max_tokens, swaps = (8, 32, 3) if args.quick else (args.requests, args.max_tokens, 5)
    results: dict[str, dict[str, float]] = {}
    workdir = Path(tempfile.mkdtemp(prefix="espalier-bench-"))
    for name in args.engines.split(","):
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        if name == "hf":
            from transformers import AutoTokenizer

            ids = prompts(AutoTokenizer.from_pretrained(model_dir), n)
            results[name] = hf_generate(model_dir, ids, max_tokens)
            continue
        if name == "vllm":
            from espalier.inference.vllm_engine import VLLMEngine

            engine = VLLMEngine(model_dir, max_model_len=2048)
        else:
            from espalier.inference.hf_engine import TransformersEngine

            engine = TransformersEngine(model_dir)
        try:
            ids = prompts(engine.tokenizer, n)
            results[name] = engine_throughput(engine, ids, max_tokens)
            results[name] |= swap_latency(engine, model_dir, swaps, workdir / name)
            if name == "vllm":
                results[name]["start_s"] = engine.start_seconds
        finally:
            engine.close()
    results["settings"] = {"requests": n, "max_tokens": max_tokens, "swaps": swaps, "threads": torch.get_num_threads()}
    return results


def table(results: dict[str, dict[str, float]]) -> str:
    s = results["settings"]
    lines = [
        f"{s['requests']} concurrent chat requests, up to {s['max_tokens']} new tokens each, temperature 1.0",
        "",
        "| engine | tokens | seconds | tokens/s | adapter swap ms (median / max) | start s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        if name == "settings":
            continue
        swap = f"{r['swap_ms_median']:.1f} / {r['swap_ms_max']:.1f}" if "swap_ms_median" in r else "n/a"
        start = f"{r['start_s']:.1f}" if "start_s" in r else ""
        lines.append(f"| {name} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens_per_s']:.1f} | {swap} | {start} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    p.add_argument("--engines", default="vllm,transformers,hf")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="8 requests x 32 tokens, 3 swaps")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    results = run(args)
    print(table(results))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
