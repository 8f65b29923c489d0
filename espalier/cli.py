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


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="train a recipe end to end", description="Train a recipe end to end.")
    p.add_argument("recipe", choices=["multihop"], help="the recipe (multihop: DSPy's multi-hop research)")
    add_flags(p, RunOptions, skip=("extra_train_kwargs",))
    p.add_argument("--verbose", action="store_true", help="debug logging")



def _eval_parser(sub) -> None:
    from espalier.recipes.multihop.eval_job import EvalOptions

    p = sub.add_parser("eval", help="score a run's checkpoint or a saved program on a data split",
                       description="Score a run's checkpoint (or a saved program.json) on a data split; prints recall "
                       "and format failures and writes one JSON line per example.")
    p.add_argument("target", help="a run directory (runs/multihop-...) or a saved program.json")
    add_flags(p, EvalOptions, skip=("target",), show_default=False)
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
