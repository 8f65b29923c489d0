"""Where the learning signal is: what the untrained program's rollouts can teach GRPO.

GRPO learns only from groups whose runs score differently. On the multi-hop program a run
scores above the first search only when a follow-up query retrieves a gold page the claim
itself did not find, which needs the bridge entity (named only on a first-hop page) to reach
the notes and then the query. For each sampling temperature this samples G runs of the
untrained program on k training claims and reports, per run:

- groups with variance: share of claims whose G runs do not all score the same
- new gold: share of runs whose follow-up query retrieved a gold page the first search missed
- bridge in notes / in query: share of runs whose notes / follow-up query name a missing gold title
- distinct queries per group (of G)

    python -m benchmarks.signal [--claims 12] [--group 6] [--temperatures 0.4 0.7 1.0] [--adapter fieldwise]
                                [--num-docs 3] [--max-tokens 64] [--data synthetic | hotpotqa:DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import dspy


@dataclass(frozen=True)
class RunTrace:
    score: float
    queries: tuple[str, ...]
    new_gold: bool
    bridge_in_notes: bool
    bridge_in_query: bool


def trace_run(example: dspy.Example, lm: dspy.LM, adapter: dspy.Adapter, search: Callable, num_docs: int) -> RunTrace:
    from espalier.recipes.multihop import ResearchHop, recall
    from espalier.recipes.multihop.metric import normalize_title, unique_titles

    searches: list[tuple[str, list[str]]] = []

    def recording(query: str, k: int) -> list[str]:
        found = search(query, k)
        searches.append((query, unique_titles(found)))
        return found

    program = ResearchHop(num_docs=num_docs, num_hops=2, search=recording)
    program.set_lm(lm)
    with dspy.context(adapter=adapter):
        pred = program(claim=example.claim)
    first = {normalize_title(t) for t in searches[0][1]}
    later = {normalize_title(t) for _, titles in searches[1:] for t in titles}
    missing = [t.lower() for t in example.titles if normalize_title(t) not in first]
    notes, queries = " ".join(map(str, pred.notes)).lower(), tuple(q for q, _ in searches[1:])
    gold = {normalize_title(t) for t in example.titles}
    return RunTrace(
        score=recall(example, pred),
        queries=queries,
        new_gold=bool((later - first) & gold),
        bridge_in_notes=any(m in notes for m in missing),
        bridge_in_query=any(m in " ".join(queries).lower() for m in missing),
    )


def signal_row(traces: list[list[RunTrace]]) -> dict[str, float]:
    runs = [r for group in traces for r in group]

    def share(flag: str) -> float:
        return sum(getattr(r, flag) for r in runs) / len(runs)

    return {
        "mean recall": statistics.mean(r.score for r in runs),
        "groups with variance": sum(len({r.score for r in g}) > 1 for g in traces) / len(traces),
        "new gold": share("new_gold"),
        "bridge in notes": share("bridge_in_notes"),
        "bridge in query": share("bridge_in_query"),
        "distinct queries / group": statistics.mean(len({q for r in g for q in r.queries}) for g in traces),
    }


def main() -> None:
    import espalier
    from espalier.program.provider import ArborProvider
    from espalier.recipes.multihop import BM25Retriever, load_multihop
    from espalier.recipes.multihop.job import make_adapter

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claims", type=int, default=12)
    parser.add_argument("--group", type=int, default=6)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.4, 0.7, 1.0])
    parser.add_argument("--adapter", default="fieldwise")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--num-docs", type=int, default=3)
    parser.add_argument("--data", default="synthetic", help="a `--data` spec of `espalier run multihop`")
    args = parser.parse_args()

    data = load_multihop(args.data, seed=0, **({"dev_size": 40} if args.data == "synthetic" else {}))
    search, adapter = BM25Retriever(data.corpus), make_adapter(args.adapter)
    server = espalier.init(run_dir=tempfile.mkdtemp(prefix="espalier-signal-"))
    claims = data.train[: args.claims]
    rows = {}
    for temperature in args.temperatures:
        lm = dspy.LM(model=f"openai/arbor:{server['model']}", provider=ArborProvider(), api_base=server["base_url"],
                     api_key=server.get("api_key") or "local", temperature=temperature, max_tokens=args.max_tokens,
                     cache=False, num_retries=0)  # fmt: skip
        jobs = [ex for ex in claims for _ in range(args.group)]
        with ThreadPoolExecutor(args.claims * args.group // 4 or 1) as pool:
            runs = list(
                pool.map(partial(trace_run, lm=lm, adapter=adapter, search=search, num_docs=args.num_docs), jobs)
            )
        rows[temperature] = signal_row([runs[i : i + args.group] for i in range(0, len(runs), args.group)])
    print(
        f"### [CPU] Learning signal of the untrained program ({args.claims} claims x G {args.group}, "
        f"adapter {args.adapter}, max_tokens {args.max_tokens}, num_docs {args.num_docs}, data {args.data})\n"
    )
    names = list(next(iter(rows.values())))
    print("| temperature | " + " | ".join(names) + " |\n| ---: |" + " ---: |" * len(names))
    for temperature, row in rows.items():
        print(
            f"| {temperature} | "
            + " | ".join(f"{v:.1f}" if k.startswith("distinct") else f"{v:.3f}" for k, v in row.items())
            + " |"
        )


if __name__ == "__main__":
    main()
