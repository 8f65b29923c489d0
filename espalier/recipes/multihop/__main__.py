"""`python -m espalier.recipes.multihop SPEC... [--k 2 3 4]`: how much one search finds.

For each data spec ("synthetic", "hotpotqa:<dir>", ...) print the mean recall of the gold
titles and the share of claims fully covered by one BM25 search with the claim alone, and
with an oracle second search that names the missing pages.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from espalier.recipes.multihop.loaders import load_multihop
from espalier.recipes.multihop.retriever import BM25Retriever
from espalier.recipes.multihop.stats import search_recall


def main(argv: Sequence[str] | None = None) -> None:
    """Print claim-only recall@k (and with an oracle second search) for each data spec."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("specs", nargs="+", help="data specs, e.g. synthetic or hotpotqa:/path")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 3, 4])
    args = parser.parse_args(argv)
    for spec in args.specs:
        data = load_multihop(spec)
        search, examples = BM25Retriever(data.corpus), data.train + data.dev + data.test
        print(f"{spec}: {len(examples)} examples, {len(data.corpus)} passages")
        for k in args.k:
            one, two = search_recall(examples, search, k), search_recall(examples, search, k, oracle_followup=True)
            print(f"  k={k}: claim-only recall {one.mean_recall:.3f} (all gold {one.full_coverage:.3f}); "
                  f"with an oracle 2nd search {two.mean_recall:.3f} (all gold {two.full_coverage:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
