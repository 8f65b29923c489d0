"""Rollouts: generated tokens/s for one GRPO step's worth of concurrent `ResearchHop` runs.

Espalier's server with each engine runs k x G programs (`threads` in flight), as `ArborGRPO`
does in `espalier run multihop` (the job's adapter and sampling settings); the alternative,
plain transformers `generate` at the same temperature, gets the very prompts the first
engine's last repetition sent, batched by position in the run (every run's first call in
one batch, then every second call), in a fresh process (so its memory peak is its own).
Tokens are completion tokens up to and including EOS; wall time includes DSPy, BM25 and
HTTP for the servers, only `generate` for the alternative.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import Section, Table, fmt, median, ratio, timed
from benchmarks.isolated import run_isolated
from benchmarks.memory import peak_rss_mb
from benchmarks.program import SAMPLING, adapter_name, generated_tokens, prompt_waves, rollouts

LIMITS = (
    "On 2 CPU cores every system is compute-bound on a 135M model; the servers pay DSPy, BM25 and HTTP per call "
    "while plain `generate` gets pre-tokenised, pre-batched prompts with no dependency between calls, so it is a "
    "generous baseline. Few runs in quick mode under-fill vLLM's batches."
)

HF = "plain transformers generate (same prompts, batched per call position)"


def engine_runs(bench, engine: str) -> tuple[dict, list]:
    """Median tokens/s of `reps` steps' rollouts through Espalier's server with `engine`."""
    s = bench.sizes
    server = bench.server(engine)
    rollouts(bench, server, 1, 1, s.max_tokens, offset=s.k)  # warm-up: one run
    rates, tokens, seconds, runs = [], [], [], []
    for _ in range(s.reps):
        sec, runs = timed(lambda: rollouts(bench, server, s.k, s.G, s.max_tokens))
        if not generated_tokens(runs):
            reasons = sorted({r.failure or "" for r in runs})
            raise RuntimeError(f"no tokens generated through the {engine} server ({server['log']}): {reasons}")
        rates.append(generated_tokens(runs) / sec)
        tokens.append(generated_tokens(runs))
        seconds.append(sec)
    import psutil

    tree = [server["pid"], *(p.pid for p in psutil.Process(server["pid"]).children(recursive=True))]
    result = {"tokens_per_s": median(rates), "samples": rates, "tokens": median(tokens), "seconds": median(seconds),
              "calls": sum(len(r.calls) for r in runs), "server_start_s": server["start_s"],
              "peak_rss_mb": sum(peak_rss_mb(p) for p in tree)}
    return result, runs


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
        runs[f"Espalier server, {engine} engine"], last = engine_runs(bench, engine)
        waves = waves or prompt_waves(last)
        if engine != bench.grpo_engine:
            bench.stop_server(engine)  # not needed again: free its memory and any idle CPU
    runs[HF] = run_isolated(hf_waves, str(bench.model_dir), waves, s.max_tokens, s.reps, str(bench.adapter),
                            SAMPLING["temperature"])
    best = runs[f"Espalier server, {bench.grpo_engine} engine"]["tokens_per_s"]  # the engine the job uses here
    rows = [[name, fmt(r["tokens_per_s"]), ratio(best, r["tokens_per_s"]) if r["tokens_per_s"] != best else "1.00x",
             fmt(r["tokens"], 0), fmt(r["seconds"], 2)] for name, r in runs.items()]
    table = Table(
        f"Rollouts: {s.k} claims x {s.G} runs of ResearchHop (num_docs={s.num_docs}, num_hops={s.num_hops}), "
        f"{s.threads} in flight, up to {s.max_tokens} new tokens per call, {adapter_name()}, "
        f"temperature {SAMPLING['temperature']:g}",
        ["system", "generated tokens/s", f"{bench.grpo_engine} engine's speed-up over it", "tokens (median)",
         "seconds (median)"],
        rows,
        [f"Median of {s.reps} steps after a warm-up run; server wall time includes DSPy, BM25 and HTTP.",
         "Plain `generate` runs the same prompts as one batch per call position (no server, no adapter swap, no "
         "stop at the adapter's next field header, so its calls may run longer).",
         "Every system samples with the same recipe-shaped LoRA adapter active (r 8, every projection), as rollouts "
         "do after the first GRPO step."],
    )
    return Section("rollouts", [table], {"runs": runs, "waves": [len(w) for w in waves]}, limits=LIMITS)
