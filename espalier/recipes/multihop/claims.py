"""Claims (and some questions) over the synthetic world that need 2 or 3 pages to check.

Each claim names its starting entity and a final attribute, never the bridge entities in
between: "The author of <book> was born in a city on the <river>." needs the book's page
(its author), the author's page (the birthplace) and the city's page (the river). The gold
titles are exactly those pages. Every relation has several wordings so that a policy
trained on them learns the pattern, not the sentence.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from espalier.recipes.multihop.world import Entity, World

Path = Callable[[World, Entity], tuple[list[str], dict[str, str]] | None]


@dataclass(frozen=True)
class ClaimType:
    name: str
    start: str  # kind of the entity the claim names
    path: Path  # -> (gold titles, template slots), or None when the start entity does not fit
    templates: tuple[str, ...]

    @property
    def hops(self) -> int:
        return 3 if self.name.count(">") == 3 else 2


def _via(*relations: str) -> Path:
    """Follow `relations` from the start entity; the slots are every entity's attributes."""

    def path(world: World, start: Entity) -> tuple[list[str], dict[str, str]] | None:
        chain, slots = [start], {}
        for rel in relations:
            nxt = chain[-1].attrs.get(rel)
            if not nxt or nxt not in world.entities:
                return None
            chain.append(world[nxt])
        for e in chain[1:]:  # later entities win: "city" is the university's city, not the architect's birthplace
            slots.update(e.attrs)
        return [e.title for e in chain], {**slots, "start": start.title}

    return path


def _final(path: Path) -> Path:
    """Drop the last entity of the chain from the gold: the claim names it (e.g. a city)."""

    def inner(world: World, start: Entity):
        out = path(world, start)
        return None if out is None else (out[0][:-1], out[1])

    return inner


def _landmark(world: World, start: Entity) -> tuple[list[str], dict[str, str]] | None:
    city = world[start.attrs["city"]]
    buildings = world.linking("building", "city", city.title)
    if not buildings:
        return None
    b, kind = buildings[0], buildings[0].attrs["building"]
    a_building = f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"
    return [start.title, city.title, b.title], {"start": start.title, "a_building": a_building,
                                                "architect": b.attrs["architect"]}  # fmt: skip


CLAIM_TYPES = (
    ClaimType(
        "book>author>city",
        "book",
        _via("author"),
        (
            "The author of {start} was born in {city}.",
            "{start} was written by someone born in {city}.",
            "The writer of {start} comes from {city}.",
            "Where was the author of {start} born?",
        ),
    ),
    ClaimType(
        "book>author>university",
        "book",
        _via("author"),
        (
            "The author of {start} studied at {university}.",
            "{start} was written by a graduate of {university}.",
            "Which university did the writer of {start} attend?",
        ),
    ),
    ClaimType(
        "building>architect>city",
        "building",
        _via("architect"),
        (
            "The architect of {start} was born in {city}.",
            "{start} was designed by an architect from {city}.",
            "Where was the architect who designed {start} born?",
        ),
    ),
    ClaimType(
        "company>founder>university",
        "company",
        _via("founder"),
        (
            "The founder of {start} studied at {university}.",
            "{start} was founded by a graduate of {university}.",
            "Where did the founder of {start} study?",
        ),
    ),
    ClaimType(
        "film>director>city",
        "film",
        _via("director"),
        (
            "The director of {start} was born in {city}.",
            "{start} was directed by a filmmaker from {city}.",
            "Where was the director of {start} born?",
        ),
    ),
    ClaimType(
        "person>city>river",
        "person",
        _via("city"),
        (
            "{start} was born in a city on the {river}.",
            "The home town of {start} lies on the {river}.",
            "Which river flows through the birthplace of {start}?",
        ),
    ),
    ClaimType(
        "person>city>region",
        "person",
        _via("city"),
        (
            "{start} was born in a town in {region}.",
            "The city where {start} was born is in {region}.",
            "In which region was {start} born?",
        ),
    ),
    ClaimType(
        "person>university>city",
        "person",
        _final(_via("university", "city")),
        (
            "{start} studied at a university in {city}.",
            "The university that {start} attended is in {city}.",
            "In which city did {start} go to university?",
        ),
    ),
    ClaimType(
        "person>city>product",
        "person",
        _via("city"),
        (
            "{start} comes from a town known for its {product}.",
            "The birthplace of {start} is famous for {product}.",
            "What is the home town of {start} known for?",
        ),
    ),
    ClaimType(
        "book>author>city>river",
        "book",
        _via("author", "city"),
        (
            "The author of {start} was born in a city on the {river}.",
            "{start} was written by someone from a town on the {river}.",
            "Which river flows through the home town of the author of {start}?",
        ),
    ),
    ClaimType(
        "building>architect>university>city",
        "building",
        _final(_via("architect", "university", "city")),
        (
            "The architect of {start} studied at a university in {city}.",
            "{start} was designed by someone who went to university in {city}.",
            "In which city did the architect of {start} study?",
        ),
    ),
    ClaimType(
        "company>founder>city>region",
        "company",
        _via("founder", "city"),
        (
            "The founder of {start} was born in {region}.",
            "{start} was founded by someone from {region}.",
            "In which region was the founder of {start} born?",
        ),
    ),
    ClaimType(
        "film>director>university>city",
        "film",
        _final(_via("director", "university", "city")),
        (
            "The director of {start} studied in {city}.",
            "{start} was made by a director who studied in {city}.",
            "In which city did the director of {start} go to university?",
        ),
    ),
    ClaimType(
        "person>city>landmark>architect",
        "person",
        _landmark,
        (
            "The town where {start} was born has {a_building} designed by {architect}.",
            "{architect} designed {a_building} in the birthplace of {start}.",
        ),
    ),
    ClaimType(
        "person>university>city>river",
        "person",
        _via("university", "city"),
        (
            "{start} studied in a city on the {river}.",
            "The university that {start} attended stands on the {river}.",
            "Which river flows through the city where {start} went to university?",
        ),
    ),
)


def make_claims(world: World, rng: random.Random, n: int, three_hop_share: float) -> list[tuple[str, list[str]]]:
    """`n` (claim, gold titles) pairs, each about a different starting entity."""
    by_hops = {h: [t for t in CLAIM_TYPES if t.hops == h] for h in (2, 3)}
    used: set[str] = set()
    claims: list[tuple[str, list[str]]] = []
    attempts = 0
    while len(claims) < n:
        attempts += 1
        if attempts > 50 * n:
            raise ValueError(f"The world is too small for {n} claims; raise `scale` or lower the split sizes.")
        ctype = rng.choice(by_hops[3 if rng.random() < three_hop_share else 2])
        start = rng.choice(world.of_kind(ctype.start))
        out = None if start.title in used else ctype.path(world, start)
        if out is None:
            continue
        gold, slots = out
        used.add(start.title)
        claims.append((rng.choice(ctype.templates).format(**slots), gold))
    return claims
