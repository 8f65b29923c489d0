"""BM25 retrieval over "title | text" passages, as in DSPy's multi-hop RL tutorial.

Same scorer as the tutorial: bm25s with k1=0.9, b=0.4, English stopwords and the Snowball
English stemmer (PyStemmer). Departures:
1. Thread-safe: DSPy runs the program in many threads, and a PyStemmer `Stemmer` must not be
   shared between threads, so tokenising and scoring a query hold a lock (a query takes
   about a millisecond on a corpus of thousands of passages).
2. `k` is clamped to the corpus size (bm25s raises otherwise); an empty corpus is an error.
3. `copy.deepcopy` returns the same retriever: the index is read-only, and DSPy deep-copies
   programs (and so their `search` attribute) for every candidate. It pickles (the lock and
   stemmer are rebuilt on load), so a program holding it can be saved whole.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import bm25s
import Stemmer

K1, B = 0.9, 0.4


class BM25Retriever:
    """`retriever(query, k) -> list[str]`: the k best passages for `query`, best first."""

    def __init__(self, passages: Sequence[str]):
        if not passages:
            raise ValueError("BM25Retriever needs at least one passage ('title | text' strings).")
        self.passages = list(passages)
        self._stemmer = Stemmer.Stemmer("english")
        self._lock = threading.Lock()
        tokens = self._tokenize(self.passages)
        self._index = bm25s.BM25(k1=K1, b=B)
        self._index.index(tokens, show_progress=False)

    def _tokenize(self, texts: list[str]) -> list[list[str]]:
        return bm25s.tokenize(texts, stopwords="en", stemmer=self._stemmer, show_progress=False, return_ids=False)

    def __call__(self, query: str, k: int) -> list[str]:
        k = min(int(k), len(self.passages))
        if k <= 0:
            return []
        with self._lock:
            tokens = self._tokenize([query])
            docs, _ = self._index.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        return [self.passages[i] for i in docs[0]]

    def __len__(self) -> int:
        return len(self.passages)

    def __deepcopy__(self, memo: dict) -> BM25Retriever:
        return self

    def __getstate__(self) -> dict:  # the lock and the stemmer do not pickle; they are rebuilt on load
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_stemmer")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._stemmer = Stemmer.Stemmer("english")
        self._lock = threading.Lock()
