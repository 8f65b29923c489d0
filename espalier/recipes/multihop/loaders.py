"""Loaders for real multi-hop data: HotpotQA, MuSiQue, HoVer, and JSONL corpora.

Each returns `MultihopData(train, dev, test, corpus)`. Departures from DSPy's tutorial:
1. HoVer keeps the tutorial's filter and split (3-hop claims, one per `hpqa_id`, shuffled
   with `random.Random(0)`, 600 train / 300 dev / the rest test) but also reads a local
   JSON/JSONL file, and only tries the `datasets` hub when no file is given.
2. HotpotQA and MuSiQue (questions, not claims) are split the same way with a seed and
   sizes given as counts or fractions; their corpus is a given corpus file or, without one,
   the union of the questions' own paragraphs.
`load_multihop(spec)` picks a loader from a spec string (see `SPEC_FORMS`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from espalier.recipes.multihop import hover
from espalier.recipes.multihop.data import MultihopData, make_example, make_passage, split_examples, unique_passages
from espalier.recipes.multihop.synthetic import generate_world

SPEC_FORMS = (
    "'synthetic'",
    "'hotpotqa:<questions.json or a folder with questions.json [+ corpus.json]>'",
    "'musique:<questions.json/.jsonl or a folder with questions.json [+ corpus.json]>'",
    "'hover:<hover.json/.jsonl or a folder>' or 'hover:hub' (needs the `datasets` package and the hub)",
)


def read_json(path: Path) -> Any:
    """A JSON document, or the list of objects of a JSONL file."""
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix != ".jsonl":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass  # JSONL under another name
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_records(path: Path) -> list[dict[str, Any]]:
    """A JSON list or a JSONL file of objects."""
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list or JSONL of records, got a JSON {type(data).__name__}.")
    return data


def _require(records: list[Any], fields: tuple[str, ...], what: str, path: Path) -> None:
    """Fail with the expected fields unless the first record looks like `what`."""
    if not records:
        raise ValueError(f"{path} holds no records; expected {what} records with fields {list(fields)}.")
    rec = records[0]
    missing = [f for f in fields if f not in rec] if isinstance(rec, dict) else list(fields)
    if missing:
        got = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
        raise ValueError(f"{path} does not look like {what}: expected records with fields {list(fields)}, "
                         f"missing {missing}; got {got}.")  # fmt: skip


def corpus_from_records(records: Iterable[Any]) -> list[str]:
    """Passages from `{title: [sentences] | text}` or records `{title, text | sentences}`."""
    if isinstance(records, dict):
        if not all(isinstance(s, str | list) for s in records.values()):
            raise ValueError("A corpus given as a JSON object must map each title to its text or sentences.")
        return unique_passages(make_passage(t, s) for t, s in records.items())
    passages = []
    for rec in records:
        if not isinstance(rec, dict) or "title" not in rec or not ({"text", "sentences"} & rec.keys()):
            raise ValueError(f"Corpus records need fields 'title' and 'text' (a string or a list of sentences); "
                             f"got {rec!r:.200}.")  # fmt: skip
        passages.append(make_passage(rec["title"], rec.get("text", rec.get("sentences"))))
    return unique_passages(passages)


def load_corpus_jsonl(path: str | Path) -> list[str]:
    """A corpus file: JSONL (or a JSON list) of `{title, text}` records, or a JSON `{title: sentences}`."""
    return corpus_from_records(read_json(Path(path)))


def _locate(path: Path, corpus: str | Path | None) -> tuple[Path, Path | None]:
    """(questions file, corpus file or None) for a file or a folder."""
    if path.is_file():
        found = [path.parent / n for n in ("corpus.json", "corpus.jsonl") if (path.parent / n).is_file()]
        return path, Path(corpus) if corpus else (found[0] if found and found[0] != path else None)
    if not path.is_dir():
        raise ValueError(f"{path} does not exist; give a questions file or a folder holding one.")
    files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl") and not p.stem.startswith("corpus"))
    named = [p for p in files if p.stem == "questions"]
    if not named and len(files) != 1:
        raise ValueError(f"{path}: expected questions.json (or a single .json/.jsonl file) beside an optional "
                         f"corpus.json; found {[p.name for p in files]}.")  # fmt: skip
    corpus_files = [path / n for n in ("corpus.json", "corpus.jsonl") if (path / n).is_file()]
    return (named or files)[0], Path(corpus) if corpus else (corpus_files[0] if corpus_files else None)


def _split(examples: list, corpus: list[str], sizes: dict[str, Any], seed: int) -> MultihopData:
    train, dev, test = split_examples(examples, sizes.get("train_size", 0.6), sizes.get("dev_size", 0.2),
                                      sizes.get("test_size"), seed)  # fmt: skip
    return MultihopData(train, dev, test, corpus)


def load_hotpotqa(path: str | Path, corpus: str | Path | None = None, seed: int = 0, **sizes: Any) -> MultihopData:
    """HotpotQA's official JSON (`_id, question, answer, supporting_facts, context`).

    Gold titles: the titles in `supporting_facts`. Corpus: `corpus` (or a corpus.json beside the
    questions), else the union of the questions' `context` paragraphs."""
    qfile, cfile = _locate(Path(path), corpus)
    records = read_records(qfile)
    _require(records, ("question", "supporting_facts", "context"), "HotpotQA", qfile)
    examples = [make_example(r["question"], [t for t, _ in r["supporting_facts"]], id=r.get("_id"),
                             answer=r.get("answer")) for r in records]  # fmt: skip
    if cfile is not None:
        passages = load_corpus_jsonl(cfile)
    else:
        passages = unique_passages(make_passage(t, s) for r in records for t, s in r["context"])
    return _split(examples, passages, sizes, seed)


def load_musique(path: str | Path, corpus: str | Path | None = None, seed: int = 0, **sizes: Any) -> MultihopData:
    """MuSiQue JSON/JSONL (`id, question, answer, paragraphs[{idx, title, paragraph_text, is_supporting}]`).

    Gold titles: titles of the supporting paragraphs; questions without any (MuSiQue's
    unanswerable ones) are dropped. Corpus: `corpus` (`[{title, text}]`) or the paragraphs."""
    qfile, cfile = _locate(Path(path), corpus)
    records = read_records(qfile)
    _require(records, ("question", "paragraphs"), "MuSiQue", qfile)
    examples = []
    for r in records:
        gold = [p["title"] for p in r["paragraphs"] if p.get("is_supporting")]
        if gold and r.get("answerable", True):
            examples.append(make_example(r["question"], gold, id=r.get("id"), answer=r.get("answer")))
    if cfile is not None:
        passages = load_corpus_jsonl(cfile)
    else:
        passages = unique_passages(make_passage(p["title"], p["paragraph_text"]) for r in records
                                   for p in r["paragraphs"])  # fmt: skip
    return _split(examples, passages, sizes, seed)


def load_hover(path: str | Path | None = None, corpus: str | Path | None = None, seed: int = 0,
               train_size: int = 600, dev_size: int = 300) -> MultihopData:  # fmt: skip
    """HoVer claims (see `hover.py`) from a local file or folder, or the hub when `path` is None."""
    if path is None:
        records = hover.hover_records_from_hub()
        cfile = Path(corpus) if corpus else None
    else:
        qfile = hover.hover_file(Path(path))
        records = read_records(qfile)
        cfile = Path(corpus) if corpus else hover.find_hover_corpus(qfile.parent)
    _require(records, ("claim", "supporting_facts", "num_hops", "hpqa_id"), "HoVer", Path(path or hover.HUB_ID))
    if cfile is None:
        raise ValueError("HoVer has no corpus of its own: pass corpus=<JSONL of {title, text}> (the tutorial uses "
                         "wiki.abstracts.2017.jsonl) or put corpus.jsonl beside the claims file.")  # fmt: skip
    return hover.split_hover(hover.hover_examples(records), load_corpus_jsonl(cfile), seed, train_size, dev_size)


def load_multihop(spec: str, corpus: str | Path | None = None, seed: int = 0, **options: Any) -> MultihopData:
    """Data for the recipe from a spec: one of `SPEC_FORMS`.

    `corpus` overrides the corpus file; `seed` and `options` go to the loader (split sizes
    `train_size`, `dev_size`, `test_size`; for 'synthetic' also `scale`, `three_hop_share`)."""
    kind, _, where = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "synthetic" and not where:
        return generate_world(seed=seed, **options)
    if kind == "hover" and where in ("", "hub"):
        return load_hover(None, corpus, seed, **options)
    loaders = {"hotpotqa": load_hotpotqa, "musique": load_musique, "hover": load_hover}
    if kind not in loaders or not where:
        raise ValueError(f"Unknown data spec {spec!r}; use one of: {', '.join(SPEC_FORMS)}.")
    return loaders[kind](Path(where).expanduser(), corpus, seed, **options)
