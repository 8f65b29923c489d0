"""`MultihopData` (train, dev, test, corpus) and the helpers every loader shares.

Examples are `dspy.Example(claim=..., titles=[gold titles]).with_inputs("claim")`; the input
is called `claim` even when it is a question, as in DSPy's multi-hop RL tutorial. Passages
are "title | text" strings.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import dspy

from espalier.recipes.multihop.metric import SEPARATOR, normalize_title, passage_title


@dataclass
class MultihopData:
    train: list[dspy.Example]
    dev: list[dspy.Example]
    test: list[dspy.Example]
    corpus: list[str]

    def fingerprint(self) -> str:
        """sha256 of the corpus and every split's claims and gold titles (for run logs and caches)."""
        splits = [[(ex.claim, list(ex.titles)) for ex in split] for split in (self.train, self.dev, self.test)]
        return hashlib.sha256(json.dumps([self.corpus, splits]).encode()).hexdigest()

    def missing_gold(self) -> list[str]:
        """Gold titles of any split that no corpus passage carries (normalised comparison)."""
        have = {normalize_title(passage_title(p)) for p in self.corpus}
        gold = [t for ex in self.train + self.dev + self.test for t in ex.titles]
        return [t for t in dict.fromkeys(gold) if normalize_title(t) not in have]


def make_example(claim: str, titles: Iterable[str], **extra: object) -> dspy.Example:
    """An example with deduplicated gold titles (order kept); `extra` fields ride along."""
    return dspy.Example(claim=claim, titles=list(dict.fromkeys(titles)), **extra).with_inputs("claim")


def make_passage(title: str, text: str | Sequence[str]) -> str:
    if not isinstance(text, str):
        text = " ".join(s.strip() for s in text)
    return f"{title.strip()}{SEPARATOR}{' '.join(text.split())}"


def unique_passages(passages: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(passages))


def _count(size: int | float, total: int, name: str) -> int:
    if isinstance(size, float) and 0.0 <= size <= 1.0:
        return round(size * total)
    if isinstance(size, int) and size >= 0:
        return size
    raise ValueError(f"{name} must be a count (int >= 0) or a fraction (float in [0, 1]), got {size!r}.")


def split_examples(
    examples: Sequence[dspy.Example],
    train_size: int | float,
    dev_size: int | float,
    test_size: int | float | None = None,
    seed: int = 0,
) -> tuple[list[dspy.Example], list[dspy.Example], list[dspy.Example]]:
    """Shuffle with `random.Random(seed)`, then train, dev, test in that order (test: the rest
    when `test_size` is None). Sizes are counts or fractions of all examples."""
    items = list(examples)
    random.Random(seed).shuffle(items)
    n_train = _count(train_size, len(items), "train_size")
    n_dev = _count(dev_size, len(items), "dev_size")
    n_test = len(items) - n_train - n_dev if test_size is None else _count(test_size, len(items), "test_size")
    if n_train + n_dev + max(n_test, 0) > len(items) or n_test < 0:
        raise ValueError(
            f"Split sizes train {n_train} + dev {n_dev} + test {max(n_test, 0)} exceed the {len(items)} examples "
            "available: lower train_size/dev_size, or give them as fractions (e.g. train_size=0.6, dev_size=0.2)."
        )
    train, dev = items[:n_train], items[n_train : n_train + n_dev]
    return train, dev, items[n_train + n_dev : n_train + n_dev + n_test]
