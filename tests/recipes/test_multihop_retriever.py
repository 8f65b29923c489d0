"""BM25Retriever: ranking, limits, thread safety, build time."""

import copy
import pickle
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from espalier.recipes.multihop import BM25Retriever

PASSAGES = [
    "Harbour | The harbour is a place where many boats stay in the winter.",
    "Boats | Boats float on water and carry people across the harbour.",
    "Quokka | The quokka is a small marsupial; the boats of the island carry visitors.",
    "Winter | Winter is the coldest season of the year in the harbour town.",
    "Running | Runners were running in the races.",
]


def test_rare_word_ranks_its_passage_first():
    search = BM25Retriever(PASSAGES)
    assert search("boats harbour quokka", 3)[0].startswith("Quokka |")
    assert search("the winter", 1) == [PASSAGES[3]]  # stopword "the" ignored


def test_stemming_matches_word_forms():
    assert BM25Retriever(PASSAGES)("runs race", 1)[0].startswith("Running |")


def test_k_is_clamped_and_empty_corpus_rejected():
    search = BM25Retriever(PASSAGES)
    assert len(search("harbour", 50)) == len(PASSAGES)
    assert search("harbour", 0) == []
    assert len(search("zzzz unknown", 2)) == 2  # nothing matches: still k passages, as bm25s returns them
    with pytest.raises(ValueError, match="at least one passage"):
        BM25Retriever([])


def test_concurrent_queries_match_serial_results():
    passages = [f"Doc{i} | word{i % 97} word{i % 13} common text {i}" for i in range(2000)]
    search = BM25Retriever(passages)
    queries = [f"word{i % 97} word{i % 13}" for i in range(200)]
    serial = [search(q, 4) for q in queries]
    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(lambda q: search(q, 4), queries))
    assert parallel == serial


def test_deepcopy_shares_the_index_and_pickle_round_trips():
    search = BM25Retriever(PASSAGES)
    assert copy.deepcopy(search) is search
    loaded = pickle.loads(pickle.dumps(search))
    assert loaded("boats quokka", 2) == search("boats quokka", 2)


def test_builds_ten_thousand_passages_quickly():
    passages = [
        f"Title {i} | passage {i} about topic{i % 311} and subject{i % 53} in place{i % 7}" for i in range(10_000)
    ]
    start = time.perf_counter()
    search = BM25Retriever(passages)
    assert time.perf_counter() - start < 20.0  # about 0.3 s here; generous for a shared CPU
    assert search("topic17 subject17", 1)[0].startswith("Title 17 |")
