"""One full ArborGRPO step of the multi-hop recipe, its wall time split, and the server's memory peaks.

`ArborGRPO.compile` runs `step_reps + 1` steps (the first is a warm-up) of ResearchHop on the
synthetic world through Espalier's server with the job's adapter and sampling settings
(`program.py`), with validation before the first step and after the last on a few dev claims.
The split is read through public hooks only (`probes.py`): the compiler's `time/rollouts_s`
and `time/train_s`, the job's returned status (`last_swap_ms`, the trainer's per-optimizer-step
tokens/s), DSPy callbacks on LM calls, and clocks on the metric and the search. "Model compute" is time with at least one LM
request in flight plus the trainer's optimizer-step time; everything else is overhead.

Departure from the job: the metric is `JitteredMetric(recall)` (scores + a seeded jitter below
1e-3), so every group has reward variance and the step trains every sequence: the worst case
for training time. Real steps skip groups whose runs all score alike.
"""

from __future__ import annotations

import time

import dspy

from benchmarks.common import Section, Table, fmt, median
from benchmarks.memory import PeakSampler
from benchmarks.probes import Clock, LMSpans, TimedProvider
from benchmarks.program import JITTER, JOB, SAMPLING, JitteredMetric, make_lm, make_program
from espalier.recipes.multihop.job import make_adapter

LIMITS = (
    "Read through public hooks: the trainer's optimizer time is derived from its reported tokens/s, sync from the "
    f"job's last_swap_ms, export and IPC are the remainder; metric scores carry a jitter of < {JITTER:g} so every "
    "group of runs that reach the metric trains (format failures are scored without it): close to the worst case; "
    "real steps skip groups without reward variance."
)

# Every run of the step goes through the whole program: the cold model fails the job's prefill
# format at its first call on most runs (which then skip the rest and never reach the metric),
# so a step of the trained policy is measured with the adapter that always parses.
STEP_ADAPTER = "fieldwise"
VAL_EVERY = JOB.val_every  # `espalier run multihop`'s validation period: validation is amortised over it


def compile_once(bench, server: dict, n_val: int) -> dict:
    from espalier.grpo import ArborGRPO
    from espalier.recipes.multihop.job import RunOptions, train_kwargs_for

    s, provider, spans, adapter = bench.sizes, TimedProvider(), LMSpans(), make_adapter(STEP_ADAPTER)
    metric, program = Clock(JitteredMetric()), make_program(bench, make_lm(server, s.max_tokens, provider))
    program.search = search = Clock(bench.search)
    steps = s.step_reps + 1
    options = RunOptions(batch_size=s.batch, grad_accum=s.accum, max_tokens=s.max_tokens, steps=steps)
    compiler = ArborGRPO(
        metric=metric, num_dspy_examples_per_grpo_step=s.k, num_rollouts_per_grpo_step=s.G, exclude_demos=True,
        num_train_steps=steps, num_threads=s.threads, num_steps_for_val=steps, train_kwargs=train_kwargs_for(options),
        checkpoint="none", seed=options.seed, adapter=adapter, variably_invoked_predictor_grouping_mode="ragged",
        val_temperature=options.val_temperature, run_dir=str(bench.workdir / "grpo"),
    )
    marks: dict[str, list] = {"rollouts_end": [], "val_end": [], "groups": []}
    compiler.on_rollouts = lambda _: marks["rollouts_end"].append(time.perf_counter())
    compiler.on_groups = marks["groups"].append
    score = compiler.validation_score
    compiler.validation_score = lambda result: (marks["val_end"].append(time.perf_counter()), score(result))[1]
    with dspy.context(adapter=adapter, callbacks=[spans]), PeakSampler(server["pid"]) as sampler:
        compiler.compile(student=program, trainset=bench.data.train, valset=bench.data.dev[:n_val])
    return {"history": [r.to_dict() for r in compiler.history], "events": provider.events, "marks": marks, "spans": spans,
            "metric": metric, "search": search, "memory": sampler.by_role()}


def optimizer_seconds(status: dict, groups) -> float:
    """The trainer's time in optimizer steps: each step's computed tokens over its tokens/s.

    The trainer skips the forward and backward of zero-advantage sequences (their gradient is
    exactly zero with beta 0) and its tokens/s counts only the sequences it computed."""
    pairs = zip(samples(groups), computed(groups), strict=True)
    lengths = [(len(x.prompt_ids) + len(x.completion_ids)) * c for x, c in pairs]
    total, cursor = 0.0, 0
    for m in status.get("metrics", []):
        n = int(m["num_sequences"])
        tokens = sum(lengths[cursor : cursor + n])
        total += tokens / m["tokens_per_second"] if tokens and m["tokens_per_second"] > 0 else 0.0
        cursor += n
    return total


def old_logprob_seconds(status: dict) -> float:
    """The trainer's no-grad forward passes for the pre-update log-probs of the step's later optimizer steps
    (every step metric of a train step carries the step's total)."""
    metrics = status.get("metrics", [])
    return float((metrics[0].get("extra") or {}).get("time/old_logprobs_s") or 0.0) if metrics else 0.0


def samples(groups) -> list:
    """The groups' samples in the trainer's order: group by group."""
    return [x for g in groups for x in g.samples]


def computed(groups) -> list[bool]:
    """Per sample (in `samples` order): whether the trainer computes it, i.e. its advantage is not zero.

    With the jittered metric every sample is, unless every run of a group failed (a failed run
    scores the failure score, without jitter)."""
    flags = []
    for g in groups:
        mean = sum(x.reward for x in g.samples) / len(g.samples)
        flags += [abs(x.reward - mean) > 1e-9 for x in g.samples]
    return flags


def split(run: dict) -> list[dict[str, float]]:
    """Per step: seconds of each part."""
    steps = [h for h in run["history"] if h["kind"] == "step"]
    jobs = [e for e in run["events"] if e[0] == "step"]
    parts = []
    for i, h in enumerate(steps):
        end = run["marks"]["rollouts_end"][i]
        start = end - h["time/rollouts_s"]
        lm = run["spans"].busy(start, end)
        status = jobs[i][3]
        compute = optimizer_seconds(status, run["marks"]["groups"][i])
        old = old_logprob_seconds(status)
        swap = (status.get("last_swap_ms") or 0.0) / 1000
        parts.append({
            "rollouts: LM requests in flight": lm,
            "rollouts: rest (DSPy, BM25, scoring, threads)": h["time/rollouts_s"] - lm,
            "training: optimizer steps": compute,
            "training: pre-update log-probs (ratios of later optimizer steps)": old,
            "sync: adapter hot-load into the engine": swap,
            "job: batch upload, adapter export, IPC": h["time/train_s"] - compute - old - swap,
            "scoring (metric, summed over threads)": run["metric"].within(start, end),
            "BM25 search (summed over threads)": run["search"].within(start, end),
        })
    return parts


def validation(run: dict) -> tuple[float, float]:
    """(seconds of one validation pass, LM-in-flight seconds in it): the median of the first and last pass."""
    init_end = next(e[2] for e in run["events"] if e[0] == "initialize")
    last_step_end = [e[2] for e in run["events"] if e[0] == "step"][-1]
    windows = list(zip([init_end, last_step_end], run["marks"]["val_end"], strict=False))
    return median([b - a for a, b in windows]), median([run["spans"].busy(a, b) for a, b in windows])


def trained_share(groups_per_step: list) -> float:
    """The share of the timed steps' sequences that the trainer computed (1.0 with the jitter)."""
    flags = [c for groups in groups_per_step for c in computed(groups)]
    return sum(flags) / len(flags) if flags else float("nan")


def rows_of(parts: dict[str, float], val_s: float, val_lm: float, n_val: int) -> tuple[list[list[str]], float, float]:
    """(table rows, total seconds per step, of which not model compute)."""
    walltime = sum(v for k, v in parts.items() if "summed" not in k)
    total = walltime + val_s / VAL_EVERY
    training = sum(v for k, v in parts.items() if k.startswith("training:"))
    compute = parts["rollouts: LM requests in flight"] + training + val_lm / VAL_EVERY
    rows = [[k, fmt(v, 2), f"{100 * v / total:.0f}%" if "summed" not in k else "(inside rollouts)"]
            for k, v in parts.items()]
    rows.append([f"validation: 1/{VAL_EVERY} of a pass over {n_val} dev claims (greedy)", fmt(val_s / VAL_EVERY, 2),
                 f"{100 * val_s / VAL_EVERY / total:.0f}%"])
    rows.append(["**total per step**", fmt(total, 2), "100%"])
    rows.append(["**not model compute** (total - LM in flight - training)", fmt(total - compute, 2),
                 f"**{100 * (total - compute) / total:.0f}%**"])
    return rows, total, total - compute


def run(bench) -> Section:
    s = bench.sizes
    server = bench.server(bench.grpo_engine)
    result = compile_once(bench, server, s.val_claims)
    per_step = split(result)[1:]  # the first step is a warm-up
    parts = {k: median([p[k] for p in per_step]) for k in per_step[0]}
    val_s, val_lm = validation(result)
    rows, total, overhead = rows_of(parts, val_s, val_lm, s.val_claims)
    init = next(e[2] - e[1] for e in result["events"] if e[0] == "initialize")
    share = trained_share(result["marks"]["groups"][1:])
    table = Table(
        f"One ArborGRPO step ({bench.grpo_engine} engine): {s.k} claims x {s.G} runs, "
        f"{s.batch} x {s.accum} sequences per optimizer step, up to {s.max_tokens} new tokens per call, "
        f"{type(make_adapter(STEP_ADAPTER)).__name__}, temperature {SAMPLING['temperature']:g}",
        ["part", "seconds (median)", "share"],
        rows,
        [f"{f'Median over {len(per_step)} steps' if len(per_step) > 1 else 'One step'} after a warm-up step; job start (trainer process + model load) "
         f"took {init:.1f} s once.",
         "LM requests in flight include HTTP and the server's work around the engine: compute is an upper bound.",
         f"Metric scores carry a jitter of < {JITTER:g}, so every group with a run that reached the metric trains "
         f"({100 * share:.0f}% of the sequences were computed; format failures score without the metric): close "
         "to the worst case; real steps skip groups without reward variance."],
    )
    steps = [h for h in result["history"] if h["kind"] == "step"]
    data = {"parts": parts, "per_step": per_step, "validation_pass_s": val_s, "job_start_s": init,
            "memory_mb": result["memory"], "total_s": total, "not_compute_share": overhead / total,
            "trained_share": share, "history": steps}
    return Section("grpo_step", [table], data, limits=LIMITS)
