"""`ResearchHop`: the program of DSPy's "RL for multi-hop research" tutorial.

Hop 0 searches with the raw claim; `append_notes` turns the results into key facts; every
later hop asks `generate_query` for a follow-up query and searches again. The two
predictors, their signatures and instructions are the tutorial's. Departures:
1. The search function is explicit: `ResearchHop(search=...)` or, when left out, the
   module-level default set with `set_search(...)` (the tutorial reads a global `search`).
   A search is any callable `(query: str, k: int) -> list[str]` of "title | text" passages,
   e.g. `BM25Retriever(corpus)`.
2. The prediction carries `notes` (the tutorial's `key_facts`), `titles` (titles of all
   retrieved passages, deduplicated, order kept) and `retrieved_docs` (the passages, as in
   the tutorial, so the tutorial's own `recall` also works).
3. Defaults `num_docs=4, num_hops=2` (the tutorial's training configuration).
Like the tutorial, notes are not taken after the last search: they could not change what is
retrieved, and an LM call that cannot affect the reward would only add noise to training.
"""

from __future__ import annotations

from collections.abc import Callable

import dspy

from espalier.recipes.multihop.metric import unique_titles

Search = Callable[[str, int], list[str]]

GENERATE_QUERY_INSTRUCTIONS = (
    "Given a claim and some key facts, generate a follow-up search query to find the next most essential clue "
    "towards verifying or refuting the claim. The goal ultimately is to find all documents implicated by the claim."
)
APPEND_NOTES_INSTRUCTIONS = (
    "Given a claim, some key facts, and new search results, identify any new learnings from the new search results, "
    "which will extend the key facts known so far about the whether the claim is true or false. The goal is to "
    "ultimately collect all facts that would help us find all documents implicated by the claim."
)

_default_search: Search | None = None


def set_search(search: Search | None) -> None:
    """Set the search used by every `ResearchHop` built without `search=` (None clears it)."""
    global _default_search
    _default_search = search


def get_search() -> Search:
    if _default_search is None:
        raise ValueError(
            "ResearchHop has no search: pass ResearchHop(search=BM25Retriever(corpus)) "
            "or call espalier.recipes.multihop.set_search(BM25Retriever(corpus)) first."
        )
    return _default_search


class ResearchHop(dspy.Module):
    def __init__(self, num_docs: int = 4, num_hops: int = 2, search: Search | None = None):
        super().__init__()
        if num_docs < 1 or num_hops < 1:
            raise ValueError(f"ResearchHop needs num_docs >= 1 and num_hops >= 1, got {num_docs} and {num_hops}.")
        self.num_docs, self.num_hops = num_docs, num_hops
        self.search = search
        self.generate_query = dspy.ChainOfThought(
            dspy.Signature("claim, key_facts -> followup_search_query", GENERATE_QUERY_INSTRUCTIONS)
        )
        self.append_notes = dspy.ChainOfThought(
            dspy.Signature("claim, key_facts, new_search_results -> new_key_facts", APPEND_NOTES_INSTRUCTIONS)
        )

    def forward(self, claim: str) -> dspy.Prediction:
        search = get_search() if self.search is None else self.search
        key_facts: list[str] = []
        retrieved_docs: list[str] = []
        for hop in range(self.num_hops):
            query = self.generate_query(claim=claim, key_facts=key_facts).followup_search_query if hop else claim
            results = list(search(query, self.num_docs))
            retrieved_docs.extend(results)
            if hop == self.num_hops - 1:
                break
            notes = self.append_notes(claim=claim, key_facts=key_facts, new_search_results=results)
            key_facts.append(notes.new_key_facts)
        return dspy.Prediction(notes=key_facts, titles=unique_titles(retrieved_docs), retrieved_docs=retrieved_docs)
