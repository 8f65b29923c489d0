"""Invented names and word pools for the synthetic world (no real entity is named).

Names are built from syllables, so they are single rare tokens for BM25; a small pool of
first names and a larger pool of surnames make people share name parts (distractors).
"""

from __future__ import annotations

import random

ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "pr", "r", "s", "st",
          "t", "tr", "v", "z", "th", "sh", "ch", "w", "j"]  # fmt: skip
VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "i", "ai", "ou"]
CODAS = ["", "", "", "n", "r", "l", "s", "th", "m", "nd", "rt", "sk", "x", "ck", "ng"]

PROFESSIONS = {
    "writer": ["novelist", "writer", "author"],
    "architect": ["architect", "building designer"],
    "director": ["film director", "filmmaker"],
    "founder": ["engineer", "businessman", "industrialist", "inventor"],
    "other": ["painter", "composer", "chemist", "sculptor", "historian", "physician", "poet", "botanist"],
}
SUBJECTS = ["law", "medicine", "chemistry", "history", "music", "painting", "engineering", "economics",
            "philosophy", "mathematics", "botany", "architecture", "literature", "physics"]  # fmt: skip
PRODUCTS = ["wool", "glass", "salt", "tea", "copper", "silk", "clocks", "pottery", "paper", "ships", "cheese",
            "wine", "lace", "timber", "marble", "amber", "bells", "saddles", "honey", "rope"]  # fmt: skip
DIRECTIONS = ["north", "south", "east", "west", "north-east", "south-west", "centre"]
BUILDING_KINDS = ["Museum", "Gallery", "Library", "Tower", "Hall", "Theatre", "Opera House", "Observatory"]
COMPANY_KINDS = ["Works", "Industries", "Motors", "Press", "Foods", "Mills", "Instruments", "Shipping"]
UNI_FORMS = ["{} University", "{} College", "{} Institute of Technology", "University of {}"]
TITLE_NOUNS = ["Orchard", "River", "Lantern", "Harbour", "Winter", "Garden", "Mirror", "Salt", "Crown", "Bridge",
               "Island", "Letter", "Shadow", "Storm", "Field", "Tower", "Night", "Glass", "Stone", "Feather",
               "Door", "Bell", "Road", "Window", "Summer", "Fire", "Map", "Clock", "Sea", "Forest"]  # fmt: skip
TITLE_ADJS = ["Silent", "Last", "Hidden", "Burning", "Golden", "Broken", "Quiet", "Long", "Paper", "Iron",
              "Lost", "Distant", "Red", "White", "Second", "Narrow", "Empty", "Bright", "Cold", "Small"]  # fmt: skip
TITLE_FORMS = ["The {adj} {noun}", "{noun} of {noun2}", "The {noun} and the {noun2}", "A {adj} {noun}",
               "{adj} {noun}", "The {noun} of {place}", "The {adj} {noun2}", "{noun} and {noun2}"]  # fmt: skip


class NameMaker:
    """Seeded source of fresh invented words; never returns the same word twice."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def word(self, syllables: tuple[int, int] = (2, 2)) -> str:
        while True:
            n = self.rng.randint(*syllables)
            parts = [self.rng.choice(ONSETS) + self.rng.choice(VOWELS) for _ in range(n)]
            word = ("".join(parts) + self.rng.choice(CODAS)).capitalize()
            if len(word) >= 4 and word not in self.used:
                self.used.add(word)
                return word

    def words(self, n: int, syllables: tuple[int, int] = (2, 2)) -> list[str]:
        return [self.word(syllables) for _ in range(n)]

    def work_title(self, place: str) -> str:
        rng = self.rng
        noun, noun2 = rng.sample(TITLE_NOUNS, 2)
        form = rng.choice(TITLE_FORMS)
        title = form.format(adj=rng.choice(TITLE_ADJS), noun=noun, noun2=noun2, place=place)
        return "An " + title[2:] if title.startswith("A ") and title[2] in "AEIOU" else title
