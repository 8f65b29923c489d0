"""The recipe's reward: recall of the gold titles among the retrieved passages' titles.

As in DSPy's multi-hop RL tutorial (`recall`), with these departures:
1. Titles are compared after `normalize_title` (Unicode NFC, case-folded, underscores as
   spaces, whitespace collapsed); the tutorial compares raw strings. This makes Wikipedia
   dumps that spell titles `Foo_Bar` and corpora that spell them `Foo bar` agree.
2. The denominator is the number of distinct gold titles (the tutorial divides by the
   length of the list, which only differs when it holds duplicates).
3. The prediction may carry `titles` (what `ResearchHop` returns) or, like the tutorial's
   program, `retrieved_docs` ("title | text" passages); titles are taken from either.
4. An example without gold titles is a data error and raises `ValueError`.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

SEPARATOR = " | "


def passage_title(passage: str) -> str:
    """The title of a "title | text" passage (the whole string when it has no separator)."""
    return passage.split(SEPARATOR, 1)[0].strip()


def normalize_title(title: str) -> str:
    text = unicodedata.normalize("NFC", title).replace("_", " ").casefold()
    return " ".join(text.split())


def unique_titles(passages: Iterable[str]) -> list[str]:
    """Titles of the passages, deduplicated (by normalised title), first occurrence kept."""
    seen: set[str] = set()
    titles = []
    for passage in passages:
        title = passage_title(passage)
        key = normalize_title(title)
        if key not in seen:
            seen.add(key)
            titles.append(title)
    return titles


def predicted_titles(pred: Any) -> list[str]:
    titles = getattr(pred, "titles", None)
    if titles is None:
        titles = unique_titles(getattr(pred, "retrieved_docs", None) or [])
    return list(titles)


def recall(example: Any, pred: Any, trace: Any = None) -> float:
    """Share of `example.titles` (gold) found among the prediction's titles."""
    gold = {normalize_title(t) for t in example.titles}
    if not gold:
        raise ValueError("recall: the example has no gold titles (`example.titles` is empty).")
    found = {normalize_title(t) for t in predicted_titles(pred)}
    return len(gold & found) / len(gold)


def first_search_recall(examples: Iterable[Any], search: Any, num_docs: int) -> float:
    """Mean recall of the first search alone (the claim as the query): no LM involved.

    Every run of `ResearchHop` that parses retrieves these passages, so this is the floor of
    an always-parsing program; what the program scores above it is what its follow-up
    queries found, i.e. what the model contributes to the task."""
    scores = [recall(ex, SimpleNamespace(titles=unique_titles(search(ex.claim, num_docs)))) for ex in examples]
    return sum(scores) / max(len(scores), 1)
