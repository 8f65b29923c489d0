"""How hard a multi-hop data set is for retrieval alone: recall of one search per claim.

`search_recall(examples, search, k)` searches once with each claim and reports the mean
recall of the gold titles and the share of claims whose gold pages are all found. With
`oracle_followup=True` a second search names the gold pages still missing (what a perfect
`generate_query` would write), which bounds what the second hop can add.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import dspy

from espalier.recipes.multihop.metric import normalize_title, unique_titles
from espalier.recipes.multihop.program import Search


@dataclass(frozen=True)
class SearchRecall:
    k: int
    mean_recall: float  # mean over claims of the share of gold titles found
    full_coverage: float  # share of claims whose gold titles are all found
    n: int


def _recall(gold: list[str], titles: list[str]) -> float:
    want, got = {normalize_title(t) for t in gold}, {normalize_title(t) for t in titles}
    return len(want & got) / len(want)


def search_recall(
    examples: Sequence[dspy.Example], search: Search, k: int, oracle_followup: bool = False
) -> SearchRecall:
    scores = []
    for ex in examples:
        titles = unique_titles(search(ex.claim, k))
        if oracle_followup:
            found = {normalize_title(t) for t in titles}
            missing = [t for t in ex.titles if normalize_title(t) not in found]
            if missing:
                titles += unique_titles(search(" ".join(missing), k))
        scores.append(_recall(ex.titles, titles))
    n = max(1, len(scores))
    return SearchRecall(k, sum(scores) / n, sum(s == 1.0 for s in scores) / n, len(scores))
