"""What a follow-up query could earn: the multi-hop program's recall for fixed query policies, no LM.

Hop 0 searches with the claim, as `ResearchHop` does; the follow-up query is then one of:

- claim: the claim again (what a policy that learnt nothing new scores once every run parses)
- first passage: the text of the first passage hop 0 retrieved (copying the search results)
- bridge title: the title of a gold page hop 0 missed (an oracle: the query that names the bridge)
- claim + bridge: the claim followed by that title

    python -m benchmarks.ceiling [--data synthetic | hotpotqa:DIR | musique:DIR] [--split dev] [--num-docs 3 4]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import dspy

Policy = Callable[[dspy.Example, list[str], list[str]], str]


def _missing(example: dspy.Example, first_titles: list[str]) -> str:
    from espalier.recipes.multihop.metric import normalize_title

    found = {normalize_title(t) for t in first_titles}
    return next((t for t in example.titles if normalize_title(t) not in found), "")


POLICIES: dict[str, Policy] = {
    "claim": lambda ex, docs, titles: ex.claim,
    "first passage": lambda ex, docs, titles: docs[0].partition(" | ")[2] if docs else ex.claim,
    "bridge title": lambda ex, docs, titles: _missing(ex, titles) or ex.claim,
    "claim + bridge": lambda ex, docs, titles: f"{ex.claim} {_missing(ex, titles)}",
}


def policy_recall(examples: list[dspy.Example], search: Callable, k: int, policy: Policy) -> float:
    from espalier.recipes.multihop import recall
    from espalier.recipes.multihop.metric import unique_titles

    scores = []
    for ex in examples:
        docs = search(ex.claim, k)
        follow_up = search(policy(ex, docs, unique_titles(docs)), k)
        scores.append(recall(ex, dspy.Prediction(titles=unique_titles(docs + follow_up))))
    return statistics.mean(scores)


def main() -> None:
    from espalier.recipes.multihop import BM25Retriever, load_multihop

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="synthetic", help="a `--data` spec of `espalier run multihop`")
    parser.add_argument("--split", default="dev", choices=("train", "dev", "test"))
    parser.add_argument("--num-docs", type=int, nargs="+", default=[3, 4])
    args = parser.parse_args()

    data = load_multihop(args.data, seed=0, **({"dev_size": 40} if args.data == "synthetic" else {}))
    examples, search = getattr(data, args.split), BM25Retriever(data.corpus)
    print(f"### Recall of fixed follow-up query policies ({args.data}, {args.split}, {len(examples)} claims, no LM)\n")
    print("| policy | " + " | ".join(f"k = {k}" for k in args.num_docs) + " |\n| --- |" + " ---: |" * len(args.num_docs))
    for name, policy in POLICIES.items():
        row = [policy_recall(examples, search, k, policy) for k in args.num_docs]
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row) + " |")


if __name__ == "__main__":
    main()
