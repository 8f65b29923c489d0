"""One "title | text" passage per entity of the synthetic world, in varied wording.

Every fact a claim relies on is stated on the page of the entity it belongs to (a person's
page names their birthplace and university, a city's page its region, river and
landmarks), so each claim can be checked from its gold pages alone.
"""

from __future__ import annotations

import random

from espalier.recipes.multihop.data import make_passage
from espalier.recipes.multihop.world import Entity, World


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def person_text(e: Entity, rng: random.Random) -> str:
    a = e.attrs
    pron, prof, poss = a["pronoun"], a["profession"], "her" if a["pronoun"] == "she" else "his"
    first = rng.choice([
        f"{e.title} (born {a['year']}) is {_article(prof)} {prof} from {a['city']}.",
        f"{e.title} is {_article(prof)} {prof} who was born in {a['city']} in {a['year']}.",
        f"Born in {a['city']} in {a['year']}, {e.title} is {_article(prof)} {prof}.",
    ])  # fmt: skip
    second = rng.choice([
        f"{_cap(pron)} studied {a['subject']} at {a['university']}.",
        f"{_cap(pron)} graduated from {a['university']}, where {pron} read {a['subject']}.",
        f"{_cap(poss)} education was at {a['university']}.",
    ])  # fmt: skip
    extra = []
    if a.get("known_for"):
        extra.append(f"{_cap(pron)} is best known for {a['known_for']}.")
    if a.get("colleague") and a["colleague"] != e.title:
        extra.append(rng.choice([f"{_cap(pron)} often worked with {a['colleague']}.",
                                 f"{_cap(poss)} friend {a['colleague']} was an early influence."]))  # fmt: skip
    return " ".join([first, second, *extra])


def city_text(e: Entity, world: World, rng: random.Random) -> str:
    a = e.attrs
    first = rng.choice([
        f"{e.title} is a city in the {a['direction']} of {a['region']}, on the {a['river']}.",
        f"{e.title} is a town on the {a['river']} in the region of {a['region']}.",
        f"{e.title} lies on the banks of the {a['river']}, in {a['region']}.",
    ])  # fmt: skip
    second = rng.choice([f"{e.title} was founded in the {a['century']} century and is known for its {a['product']}.",
                         f"The town of {e.title} is famous for {a['product']} and dates from the {a['century']} century."])  # fmt: skip
    sentences = [first, second]
    landmarks = [b.title for b in world.linking("building", "city", e.title)]
    if landmarks:
        sentences.append(f"Its landmarks include {_join(landmarks)}.")
    return " ".join(sentences)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def region_text(e: Entity, world: World, rng: random.Random) -> str:
    cities = [c.title for c in world.linking("city", "region", e.title)][:3]
    text = f"{e.title} is a region in the {e.attrs['direction']} of the country."
    return text + (f" Its main towns are {_join(cities)}." if cities else "")


def river_text(e: Entity, world: World, rng: random.Random) -> str:
    cities = [c.title for c in world.linking("city", "river", e.title)][:3]
    text = f"The {e.title} is a river in the lowlands."
    return text + (f" It flows past {_join(cities)}." if cities else "")


TEMPLATES = {
    "university": ("{title} is a university in {city}, founded in {year}. It is known for its school of {subject}.",
                   "Founded in {year}, {title} is a public university located in {city}."),
    "book": ("{title} is a {year} {form} by {author}. The story is set in {setting}.",
             "{title} is a {form} written by {author} and published in {year}."),
    "film": ("{title} is a {year} film directed by {director}.",),
    "building": ("{title} is a {building} in {city}, designed by the architect {architect} and opened in {year}.",
                 "The {title} in {city} opened in {year}. It was designed by {architect}."),
    "company": ("{title} is a company based in {city} that makes {product}. It was founded in {year} by {founder}.",
                "Founded by {founder} in {year}, {title} produces {product} in {city}."),
    "club": ("{title} is a football club from {city}, founded in {year}.",),
}  # fmt: skip
PAGE_WRITERS = {"city": city_text, "region": region_text, "river": river_text}


def text_for(e: Entity, world: World, rng: random.Random) -> str:
    if e.kind == "person":
        return person_text(e, rng)
    if e.kind in PAGE_WRITERS:
        return PAGE_WRITERS[e.kind](e, world, rng)
    text = rng.choice(TEMPLATES[e.kind]).format(title=e.title, **e.attrs)
    if e.kind == "film" and e.attrs.get("based_on"):
        text += f" It is based on the book {e.attrs['based_on']}."
    return text


def write_pages(world: World, rng: random.Random) -> list[str]:
    return [make_passage(e.title, text_for(e, world, rng)) for e in world.entities.values()]
