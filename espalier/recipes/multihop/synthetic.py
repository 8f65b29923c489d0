"""`generate_world`: the recipe's default data, a seeded synthetic world that runs offline.

A corpus of about 2,500 "title | text" passages about invented entities, and claims that
need 2 or 3 of those pages (see `claims.py`). Tuned so that one BM25 search with the claim
alone finds some of the gold pages but rarely all of them, while a search naming the
bridge entity finds the rest: the program has to learn to write follow-up queries.
The same seed gives identical data in any process (no iteration over hashed sets).
"""

from __future__ import annotations

import random

from espalier.recipes.multihop.claims import make_claims
from espalier.recipes.multihop.data import MultihopData, make_example
from espalier.recipes.multihop.pages import write_pages
from espalier.recipes.multihop.world import build_world


def generate_world(
    seed: int = 0,
    train_size: int = 300,
    dev_size: int = 80,
    test_size: int = 120,
    scale: float = 1.0,
    three_hop_share: float = 0.5,
) -> MultihopData:
    """Build the world, its passages and `train_size + dev_size + test_size` claims.

    `scale` multiplies the number of entities (1.0: about 2,500 passages); `three_hop_share`
    is the share of claims that need three pages (the rest need two)."""
    if not 0.0 <= three_hop_share <= 1.0:
        raise ValueError(f"three_hop_share must be in [0, 1], got {three_hop_share}.")
    rng = random.Random(seed)
    world = build_world(rng, scale)
    corpus = write_pages(world, rng)
    claims = make_claims(world, rng, train_size + dev_size + test_size, three_hop_share)
    examples = [make_example(claim, gold, hops=len(gold)) for claim, gold in claims]
    train, dev = examples[:train_size], examples[train_size : train_size + dev_size]
    return MultihopData(train=train, dev=dev, test=examples[train_size + dev_size :], corpus=corpus)
