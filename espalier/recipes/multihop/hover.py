"""HoVer, filtered and split as in DSPy's multi-hop RL tutorial.

Keep the 3-hop claims, one per `hpqa_id` (first seen), shuffle with `random.Random(0)`, then
600 train / 300 dev / the rest test. Gold titles: the distinct titles of `supporting_facts`
(HoVer's files spell them `[[title, sentence], ...]`, the hub's `[{key, value}, ...]`).
Departure: the claims come from a local JSON/JSONL file when one is given; the `datasets`
hub (`hover-nlp/hover`, train split, as in the tutorial) is tried only without one. HoVer
has no corpus of its own: pass the tutorial's Wikipedia abstracts (or any `{title, text}`
JSONL) as `corpus`.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import dspy

from espalier.recipes.multihop.data import MultihopData, make_example

HUB_ID = "hover-nlp/hover"
CORPUS_NAMES = ("corpus.jsonl", "corpus.json", "wiki.abstracts.2017.jsonl")


def _titles(facts: list[Any]) -> list[str]:
    return [f["key"] if isinstance(f, dict) else f[0] for f in facts]


def hover_examples(records: list[dict[str, Any]], num_hops: int = 3) -> list[dspy.Example]:
    """The tutorial's filter: `num_hops` claims, deduplicated by `hpqa_id`, in input order."""
    seen: set[str] = set()
    examples = []
    for r in records:
        if r["num_hops"] != num_hops or r["hpqa_id"] in seen:
            continue
        seen.add(r["hpqa_id"])
        examples.append(make_example(r["claim"], _titles(r["supporting_facts"]), label=r.get("label")))
    return examples


def hover_records_from_hub() -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as err:
        raise ValueError("Loading HoVer from the hub needs the `datasets` package (pip install datasets), "
                         "or give a local file: 'hover:/path/to/hover_train.json'.") from err  # fmt: skip
    try:
        split = datasets.load_dataset(HUB_ID, split="train", trust_remote_code=True)
    except Exception as err:  # any hub failure (offline, script datasets unsupported) gets the same fix
        raise ValueError(f"Could not load {HUB_ID!r} from the hub ({type(err).__name__}: {err}). Download HoVer's "
                         "train file and use 'hover:/path/to/hover_train.json'.") from err  # fmt: skip
    return [dict(r) for r in split]


def split_hover(examples: list[dspy.Example], corpus: list[str], seed: int = 0,
                train_size: int = 600, dev_size: int = 300) -> MultihopData:  # fmt: skip
    items = list(examples)
    random.Random(seed).shuffle(items)
    return MultihopData(items[:train_size], items[train_size : train_size + dev_size],
                        items[train_size + dev_size :], corpus)  # fmt: skip


def find_hover_corpus(folder: Path) -> Path | None:
    return next((folder / n for n in CORPUS_NAMES if (folder / n).is_file()), None)


def hover_file(path: Path) -> Path:
    if path.is_file():
        return path
    files = sorted(p for p in path.glob("*.json*") if p.name not in CORPUS_NAMES) if path.is_dir() else []
    if len(files) != 1:
        raise ValueError(f"{path}: expected a HoVer JSON/JSONL file (or a folder holding one beside corpus.jsonl); "
                         f"found {[p.name for p in files]}.")  # fmt: skip
    return files[0]
