"""A seeded world of invented entities (regions, rivers, cities, universities, people, books,
films, buildings, companies, clubs) and the typed links between them.

`build_world(rng, scale)` makes the entities; `pages.py` writes one passage per entity.
Names are shared on purpose (people share first names and surnames, buildings and clubs
carry city and surnames, films adapt books, titles reuse the same nouns), so a search finds
look-alike distractors beside the page it needs.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from espalier.recipes.multihop import names as N


@dataclass
class Entity:
    title: str
    kind: str
    attrs: dict[str, str] = field(default_factory=dict)  # relation -> title of another entity, or a literal


@dataclass
class World:
    entities: dict[str, Entity] = field(default_factory=dict)  # title -> entity, in creation order

    def add(self, title: str, kind: str, **attrs: str) -> Entity:
        if title in self.entities:
            raise ValueError(f"duplicate title {title!r}")
        entity = Entity(title, kind, dict(attrs))
        self.entities[title] = entity
        return entity

    def of_kind(self, kind: str) -> list[Entity]:
        return [e for e in self.entities.values() if e.kind == kind]

    def linking(self, kind: str, relation: str, title: str) -> list[Entity]:
        """Entities of `kind` whose `relation` is `title` (e.g. buildings in a city)."""
        return [e for e in self.of_kind(kind) if e.attrs.get(relation) == title]

    def __getitem__(self, title: str) -> Entity:
        return self.entities[title]


COUNTS = {"region": 10, "river": 14, "city": 100, "university": 30, "writer": 350, "architect": 90,
          "director": 80, "founder": 80, "other": 700, "building": 120, "company": 90, "club": 50}  # fmt: skip


def build_world(rng: random.Random, scale: float = 1.0) -> World:
    count = {k: max(3, round(v * scale)) for k, v in COUNTS.items()}
    maker, world = N.NameMaker(rng), World()
    _places(world, maker, rng, count)
    _people(world, maker, rng, count)
    _works(world, maker, rng)
    _organisations(world, maker, rng, count)
    return world


def _places(world: World, maker: N.NameMaker, rng: random.Random, count: dict[str, int]) -> None:
    regions = [world.add(w, "region", direction=rng.choice(N.DIRECTIONS)) for w in maker.words(count["region"])]
    rivers = [world.add(f"{w} River", "river") for w in maker.words(count["river"])]
    for name in maker.words(count["city"]):
        world.add(name, "city", region=rng.choice(regions).title, river=rng.choice(rivers).title,
                  product=rng.choice(N.PRODUCTS), century=rng.choice(["12th", "13th", "14th", "15th", "16th", "17th"]),
                  direction=rng.choice(N.DIRECTIONS))  # fmt: skip
    cities = world.of_kind("city")
    for word in maker.words(count["university"]):
        title = rng.choice(N.UNI_FORMS).format(word)
        world.add(title, "university", city=rng.choice(cities).title, subject=rng.choice(N.SUBJECTS),
                  year=str(rng.randint(1400, 1960)))  # fmt: skip


def _people(world: World, maker: N.NameMaker, rng: random.Random, count: dict[str, int]) -> None:
    n_people = sum(count[k] for k in N.PROFESSIONS)
    firsts, surnames = maker.words(max(20, n_people // 9)), maker.words(max(40, n_people // 3))
    cities, unis = world.of_kind("city"), world.of_kind("university")
    for group in N.PROFESSIONS:
        for _ in range(count[group]):
            while (title := f"{rng.choice(firsts)} {rng.choice(surnames)}") in world.entities:
                pass
            world.add(title, "person", group=group, profession=rng.choice(N.PROFESSIONS[group]),
                      city=rng.choice(cities).title, university=rng.choice(unis).title,
                      subject=rng.choice(N.SUBJECTS), year=str(rng.randint(1850, 1990)),
                      pronoun=rng.choice(["she", "he"]))  # fmt: skip
    people = world.of_kind("person")
    for person in people:
        if rng.random() < 0.3:
            person.attrs["colleague"] = rng.choice(people).title


def _fresh_title(world: World, make: Callable[[], str]) -> str:
    while (title := make()) in world.entities:
        pass
    return title


def _works(world: World, maker: N.NameMaker, rng: random.Random) -> None:
    cities = [c.title for c in world.of_kind("city")]
    writers = [p for p in world.of_kind("person") if p.attrs["group"] == "writer"]
    for writer in writers:
        for _ in range(rng.choice([1, 1, 2])):
            title = _fresh_title(world, lambda: maker.work_title(rng.choice(cities)))
            world.add(title, "book", author=writer.title, setting=rng.choice(cities),
                      year=str(min(2024, int(writer.attrs["year"]) + rng.randint(22, 60))),
                      form=rng.choice(["novel", "novel", "short story collection", "memoir"]))  # fmt: skip
        if rng.random() < 0.25:
            writer.attrs["known_for"] = world.linking("book", "author", writer.title)[0].title
    directors = [p for p in world.of_kind("person") if p.attrs["group"] == "director"]
    books = world.of_kind("book")
    for director in directors:
        for _ in range(rng.choice([1, 2, 3])):
            adapted = rng.choice(books).title if rng.random() < 0.35 else ""
            title = f"{adapted} (film)" if adapted and f"{adapted} (film)" not in world.entities else ""
            title = title or _fresh_title(world, lambda: maker.work_title(rng.choice(cities)))
            world.add(title, "film", director=director.title, based_on=adapted if title.endswith("(film)") else "",
                      year=str(min(2024, int(director.attrs["year"]) + rng.randint(25, 55))))  # fmt: skip


def _organisations(world: World, maker: N.NameMaker, rng: random.Random, count: dict[str, int]) -> None:
    cities = world.of_kind("city")
    surnames = [p.title.split()[-1] for p in world.of_kind("person")]
    architects = [p for p in world.of_kind("person") if p.attrs["group"] == "architect"]
    for _ in range(count["building"]):
        kind, city = rng.choice(N.BUILDING_KINDS), rng.choice(cities)
        stem = rng.choice([city.title, rng.choice(surnames), maker.word()])
        title = _fresh_title(world, lambda k=kind, s=stem: f"{s} {k}" if rng.random() < 0.8 else f"{maker.word()} {k}")
        world.add(title, "building", building=kind.lower(), city=city.title,
                  architect=rng.choice(architects).title, year=str(rng.randint(1780, 2015)))  # fmt: skip
    founders = [p for p in world.of_kind("person") if p.attrs["group"] == "founder"]
    for _ in range(count["company"]):
        stem = rng.choice([rng.choice(surnames), maker.word()])
        title = _fresh_title(world, lambda s=stem: f"{s} {rng.choice(N.COMPANY_KINDS)}")
        world.add(title, "company", founder=rng.choice(founders).title, city=rng.choice(cities).title,
                  product=rng.choice(N.PRODUCTS), year=str(rng.randint(1850, 2010)))  # fmt: skip
    for city in rng.sample(cities, min(count["club"], len(cities))):
        title = f"{city.title} {rng.choice(['Rovers', 'Football Club', 'Athletic', 'United'])}"
        world.add(title, "club", city=city.title, year=str(rng.randint(1870, 1990)))
