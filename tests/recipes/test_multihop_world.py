"""The synthetic world: seeded, answerable, and needing more than one search."""

import os
import re
import subprocess
import sys

import pytest

from espalier.recipes.multihop import BM25Retriever, generate_world, normalize_title, passage_title, search_recall


@pytest.fixture(scope="module")
def world():
    return generate_world(seed=0)


@pytest.fixture(scope="module")
def search(world):
    return BM25Retriever(world.corpus)


def test_same_seed_same_data_other_seed_other_data(world):
    assert generate_world(seed=0).fingerprint() == world.fingerprint()
    assert generate_world(seed=1).fingerprint() != world.fingerprint()


def test_same_seed_same_data_in_another_process_with_another_hash_seed(world):
    code = "from espalier.recipes.multihop import generate_world; print(generate_world(seed=0).fingerprint())"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == world.fingerprint()


def test_splits_and_corpus_sizes(world):
    assert (len(world.train), len(world.dev), len(world.test)) == (300, 80, 120)
    assert 2000 <= len(world.corpus) <= 4000
    titles = [passage_title(p) for p in world.corpus]
    assert len(set(titles)) == len(titles)  # a title names exactly one page
    claims = [ex.claim for ex in world.train + world.dev + world.test]
    assert len(set(claims)) == len(claims)


def test_gold_titles_exist_and_chain_through_the_pages(world):
    pages = {passage_title(p): p for p in world.corpus}
    for ex in world.train + world.dev + world.test:
        assert 2 <= len(ex.titles) <= 3 and all(t in pages for t in ex.titles)
        for a, b in zip(ex.titles, ex.titles[1:], strict=False):  # each hop is stated on one of its two pages
            assert b in pages[a] or a in pages[b], (ex.claim, a, b)


def test_claims_name_the_start_but_not_the_bridges(world):
    for ex in world.train + world.dev + world.test:
        assert ex.titles[0] in ex.claim
        assert not any(t in ex.claim for t in ex.titles[1:]), ex.claim


def test_final_value_of_each_claim_is_on_the_last_gold_page(world):
    pages = {passage_title(p): p for p in world.corpus}
    for ex in world.train + world.dev + world.test:
        rest = ex.claim.replace(ex.titles[0], " ")
        names = [w for w in re.findall(r"\b[A-Z][a-z]+\b", rest) if w not in _COMMON]
        assert all(n in pages[ex.titles[-1]] for n in names), (ex.claim, ex.titles)


_COMMON = {"The", "Which", "Where", "What", "In", "An", "A"}


def test_claim_only_search_finds_some_but_rarely_all_gold(world, search):
    claims = world.train + world.dev + world.test
    for k in (3, 4):
        one = search_recall(claims, search, k)
        assert 0.30 <= one.mean_recall <= 0.60, one
        assert one.full_coverage < 0.5, one
        oracle = search_recall(claims, search, k, oracle_followup=True)
        assert oracle.mean_recall >= one.mean_recall + 0.3, oracle


def test_every_bridge_page_is_found_by_its_name(world, search):
    for ex in world.dev:
        for title in ex.titles[1:]:
            found = [normalize_title(passage_title(p)) for p in search(title, 4)]
            assert normalize_title(title) in found, title
