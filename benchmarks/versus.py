"""The job's rollouts through the servers of several revisions of Espalier, side by side in one run.

    python -m benchmarks.versus --revs f38916e,WORKTREE,WORKTREE:vllm,WORKTREE:vllm@base [--adapters fieldwise] [--reps 2]

Each server is `REV[:ENGINE][@base]`: a git revision (or WORKTREE for the checkout as it is),
exported to a temporary directory and its server started there (`python -m
espalier.inference.server`, ENGINE the transformers engine unless named, a recipe-shaped LoRA
adapter active; `@base` samples the base model instead), all at once; then, repetition by
repetition and adapter by adapter, each server runs one step of the job's rollouts in turn
(`espalier run multihop`'s k x G runs of `ResearchHop`, all in flight, its sampling settings,
through this checkout's client code), so load changes hit every revision alike. Only the
server differs between rows. Program runs per minute count every run, format failures too
(the prefill adapter's runs end at their first unparsable call).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.common import Sizes, Table, fmt, median
from benchmarks.context import Bench, _stop_group
from benchmarks.program import JOB, SAMPLING, generated_tokens, rollouts
from benchmarks.report import markdown_table
from benchmarks.rollouts import parameters, work_tokens
from benchmarks.train_throughput import matmul_peak

ROOT = Path(__file__).resolve().parents[1]
WORKTREE = "WORKTREE"


def export(rev: str, into: Path) -> Path:
    """The source tree of `rev` (WORKTREE: this checkout) as a directory."""
    if rev == WORKTREE:
        return ROOT
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def parse(spec: str) -> tuple[str, str, bool]:
    """`REV[:ENGINE][@base]` -> (rev, engine, base)."""
    spec, _, base = spec.partition("@")
    if base not in ("", "base"):
        raise SystemExit(f"server {spec}@{base}: only @base may follow the revision and engine")
    rev, _, engine = spec.partition(":")
    return rev, engine or "transformers", bool(base)


def start_server(tree: Path, bench: Bench, name: str, engine: str = "transformers", base: bool = False,
                 timeout: float = 900.0) -> dict:
    """A server from `tree` on `engine`, serving the bench's adapter; returns its pid, URL and model id
    (the policy's, or its `@base` with `base`)."""
    from espalier.inference.launch import _wait_healthy
    from espalier.ports import free_port

    port, run_dir = free_port(), bench.workdir / f"server-{name}"
    run_dir.mkdir(parents=True)
    log = open(run_dir / "server.log", "w")  # noqa: SIM115 (the server writes to it until it stops)
    proc = subprocess.Popen(
        [sys.executable, "-m", "espalier.inference.server", "--model", str(bench.model_dir), "--engine", engine,
         "--port", str(port), "--run-dir", str(run_dir), "--adapter", str(bench.adapter)],
        env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tree, stdout=log, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(url, proc, run_dir / "server.log", timeout)
    with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as r:
        ids = [m["id"] for m in json.load(r)["data"]]
    model = next(i for i in ids if "@" not in i) + ("@base" if base else "")
    return {"pid": proc.pid, "base_url": f"{url}/v1/", "model": model, "api_key": "local"}


def step(bench: Bench, server: dict, adapter: str, k: int, G: int, offset: int = 0) -> tuple[float, list]:
    """Seconds and runs of one step's rollouts: k claims x G runs (`JOB.threads` in flight), with `adapter`."""
    from espalier.recipes.multihop.job import make_adapter

    start = time.perf_counter()
    runs = rollouts(bench, server, k, G, bench.sizes.max_tokens, offset, make_adapter(adapter))
    return time.perf_counter() - start, runs


def measure(bench: Bench, servers: dict[str, dict], adapters: list[str], reps: int) -> dict:
    s = bench.sizes
    for server in servers.values():
        step(bench, server, adapters[0], 1, 1, offset=s.k)  # warm-up
    samples: dict[tuple[str, str], list[dict]] = {}
    for rep in range(reps):
        for adapter in adapters:
            for rev, server in servers.items():
                sec, runs = step(bench, server, adapter, s.k, s.G)
                sample = {"seconds": sec, "runs": len(runs), "runs_per_min": 60 * len(runs) / sec, "tokens": generated_tokens(runs),
                          "calls": sum(len(r.calls) for r in runs), "failed": sum(bool(r.failure) for r in runs),
                          "work_tokens": work_tokens(runs)}
                bench.log(f"[versus] {rev} {adapter} rep {rep}: {sample}")
                samples.setdefault((rev, adapter), []).append(sample)
    return samples


def ceiling_runs_per_min(sample: dict, peak_s_per_token: float) -> float:
    """Runs/min if every token computed at least once (distinct prefixes) ran at the matmul peak, nothing else."""
    return 60 * sample["runs"] / (sample["work_tokens"] * peak_s_per_token)


def table(samples: dict, revs: list[str], peak: float, params: int) -> Table:
    s = JOB
    rows = []
    peak_s_per_token = 2 * params / peak  # seconds per token at the peak
    for (rev, adapter), runs in samples.items():
        rpm = median([r["runs_per_min"] for r in runs])
        first = median([r["runs_per_min"] for r in samples[(revs[0], adapter)]])
        share = median([r["work_tokens"] * peak_s_per_token / r["seconds"] for r in runs])
        ceiling = median([ceiling_runs_per_min(r, peak_s_per_token) for r in runs])
        rows.append([rev, adapter, fmt(rpm), f"{rpm / first:.2f}x", fmt(median([r["tokens"] / r["seconds"] for r in runs])),
                     f"{100 * share:.0f}%", f"{fmt(ceiling)} ({ceiling / first:.1f}x)",
                     fmt(median([r["calls"] for r in runs]), 0), fmt(median([r["failed"] for r in runs]), 0),
                     fmt(median([r["seconds"] for r in runs]), 1)])
    return Table(
        f"The job's rollouts by server revision: {s.examples_per_step} claims x {s.rollouts_per_example} runs of "
        f"ResearchHop (num_docs={s.num_docs}, num_hops={s.num_hops}), all in flight, up to {s.max_tokens} new "
        f"tokens per call, temperature {SAMPLING['temperature']:g}; adapter active unless `@base`",
        ["server (revision:engine)", "adapter", "program runs/min", f"vs {revs[0]}", "generated tokens/s",
         "share of matmul peak", f"runs/min at the peak (vs {revs[0]})", "LM calls", "failed runs", "seconds"],
        rows,
        [f"Median of {len(next(iter(samples.values())))} steps per row after a warm-up run; the rows of one "
         "repetition run one after another, every server started before the first.",
         "Client, data, adapter weights and sampling settings are this checkout's for every row: only the server "
         "(engine) differs.",
         f"Share of matmul peak: tokens computed at least once (distinct prefixes of every call's prompt and "
         f"completion) x 2 x {params / 1e6:.0f}M parameters per second, over this run's matmul peak "
         f"({peak / 1e9:.0f} GFLOP/s, the faster of bf16 and fp32). Runs/min at the peak: the same runs if those "
         "FLOPs ran at the peak and nothing else took time (no attention, DSPy, BM25 or HTTP): a ceiling."])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.versus", description=__doc__.splitlines()[0])
    p.add_argument("--revs", default=f"f38916e,{WORKTREE}",
                   help=f"comma-separated servers REV[:ENGINE][@base]; REV a git revision or {WORKTREE} (this checkout)")
    p.add_argument("--adapters", default=JOB.adapter, help="comma-separated: fieldwise, prefill, chat, json")
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args(argv)
    revs, adapters = args.revs.split(","), args.adapters.split(",")
    bench = Bench(Sizes(k=JOB.examples_per_step, G=JOB.rollouts_per_example, max_tokens=JOB.max_tokens,
                        num_docs=JOB.num_docs, num_hops=JOB.num_hops, threads=JOB.threads), engines=("transformers",),
                  log=lambda m: print(m, file=sys.stderr, flush=True))
    servers = {}
    try:
        with tempfile.TemporaryDirectory(prefix="espalier-versus-") as tmp:
            for i, spec in enumerate(revs):
                rev, engine, base = parse(spec)
                servers[spec] = start_server(export(rev, Path(tmp) / f"rev{i}"), bench, f"rev{i}", engine, base)
            samples = measure(bench, servers, adapters, args.reps)
    finally:
        for server in servers.values():
            _stop_group(server["pid"])
    import torch

    peak = max(matmul_peak(torch.bfloat16), matmul_peak(torch.float32))
    print(markdown_table(table(samples, revs, peak, parameters(bench.model_dir)), "CPU"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
