"""Loaders on small files shaped like each format, and on the shared real samples."""

import json
import random
import sys
from pathlib import Path

import pytest

from espalier.recipes.multihop import (
    load_corpus_jsonl,
    load_hotpotqa,
    load_hover,
    load_multihop,
    load_musique,
    passage_title,
)

SHARED = Path("/work/shared/data")


def write(path: Path, data, jsonl: bool = False) -> Path:
    text = "\n".join(json.dumps(r) for r in data) if jsonl else json.dumps(data)
    path.write_text(text, encoding="utf-8")
    return path


def hotpot_record(i: int) -> dict:
    return {
        "_id": f"q{i}",
        "question": f"Which city hosts team {i}?",
        "answer": "X",
        "supporting_facts": [[f"Team {i}", 0], [f"City {i}", 1], [f"Team {i}", 1]],
        "context": [[f"Team {i}", ["Team plays", " in City."]], [f"City {i}", ["A city.", " Big."]], ["Other", ["x"]]],
    }


def test_hotpotqa_corpus_from_contexts_and_seeded_split(tmp_path):
    qfile = write(tmp_path / "hotpot.json", [hotpot_record(i) for i in range(10)])
    data = load_hotpotqa(qfile, train_size=6, dev_size=2, seed=3)
    assert (len(data.train), len(data.dev), len(data.test)) == (6, 2, 2)
    assert sorted(ex.id for ex in data.train + data.dev + data.test) == sorted(f"q{i}" for i in range(10))
    assert data.train[0].titles == [f"Team {data.train[0].id[1:]}", f"City {data.train[0].id[1:]}"]
    assert "Team 0 | Team plays in City." in data.corpus and len(data.corpus) == 21  # "Other" once
    assert data.missing_gold() == [] and set(data.train[0].inputs().keys()) == {"claim"}
    again = load_hotpotqa(qfile, train_size=6, dev_size=2, seed=3)
    assert [ex.id for ex in again.train] == [ex.id for ex in data.train]


def test_hotpotqa_folder_with_corpus_json(tmp_path):
    write(tmp_path / "questions.json", [hotpot_record(i) for i in range(5)])
    write(tmp_path / "corpus.json", {"Team 1": ["Only", " this."], "City 1": "Text."})
    data = load_multihop(f"hotpotqa:{tmp_path}", train_size=1.0, dev_size=0.0)
    assert len(data.train) == 5 and data.corpus == ["Team 1 | Only this.", "City 1 | Text."]


def musique_record(i: int, supporting=(True, True)) -> dict:
    paragraphs = [
        {"idx": j, "title": f"P{i}-{j}", "paragraph_text": f"text {i} {j}", "is_supporting": s}
        for j, s in enumerate([*supporting, False])
    ]
    return {"id": f"m{i}", "question": f"q {i}?", "answer": "a", "paragraphs": paragraphs}


@pytest.mark.parametrize("jsonl", [False, True])
def test_musique_json_and_jsonl(tmp_path, jsonl):
    records = [musique_record(i) for i in range(8)] + [musique_record(99, (False, False))]  # no gold: dropped
    qfile = write(tmp_path / ("q.jsonl" if jsonl else "q.json"), records, jsonl=jsonl)
    data = load_musique(qfile, train_size=4, dev_size=2)
    assert (len(data.train), len(data.dev), len(data.test)) == (4, 2, 2)
    ex = data.train[0]
    assert ex.titles == [f"P{ex.id[1:]}-0", f"P{ex.id[1:]}-1"]
    assert len(data.corpus) == 27 and "P3-2 | text 3 2" in data.corpus


def test_musique_corpus_file(tmp_path):
    write(tmp_path / "questions.json", [musique_record(0)])
    write(tmp_path / "corpus.json", [{"title": "P0-0", "text": "t"}, {"title": "P0-1", "text": "u"}])
    data = load_multihop(f"musique:{tmp_path}", train_size=1, dev_size=0)
    assert data.corpus == ["P0-0 | t", "P0-1 | u"] and data.missing_gold() == []


def hover_records() -> list[dict]:
    records = []
    for i in range(960):
        facts = [[f"T{i}a", 0], [f"T{i}b", 2], [f"T{i}a", 1]] if i % 2 else [{"key": f"T{i}a", "value": 0}]
        records.append({"uid": str(i), "claim": f"claim {i}", "supporting_facts": facts, "num_hops": 3,
                        "hpqa_id": f"h{i}", "label": 1})  # fmt: skip
    records.insert(5, {**records[7], "claim": "duplicate hpqa_id", "uid": "d"})  # first of h7: kept, "claim 7" dropped
    records += [{**records[0], "hpqa_id": "two", "num_hops": 2, "claim": "two hops"}]
    return records


def test_hover_tutorial_filter_and_split(tmp_path):
    records = hover_records()
    write(tmp_path / "hover_train.jsonl", records, jsonl=True)
    write(tmp_path / "corpus.jsonl", [{"title": "T1a", "text": ["One.", "Two."]}, {"title": "T3b", "text": "x"}], True)
    data = load_multihop(f"hover:{tmp_path}")
    kept = []
    for r in records:  # the tutorial: 3 hops, first claim per hpqa_id, Random(0).shuffle, 600/300/rest
        if r["num_hops"] == 3 and r["hpqa_id"] not in {k["hpqa_id"] for k in kept}:
            kept.append(r)
    random.Random(0).shuffle(kept)
    assert [ex.claim for ex in data.train + data.dev + data.test] == [r["claim"] for r in kept]
    assert (len(data.train), len(data.dev), len(data.test)) == (600, 300, 60)
    claims = [ex.claim for ex in data.train + data.dev + data.test]
    assert "duplicate hpqa_id" in claims and "claim 7" not in claims and "two hops" not in claims
    by_claim = {ex.claim: ex for ex in data.train + data.dev + data.test}
    assert by_claim["claim 1"].titles == ["T1a", "T1b"] and by_claim["claim 2"].titles == ["T2a"]
    assert data.corpus == ["T1a | One. Two.", "T3b | x"]


def test_hover_needs_a_corpus_and_the_hub_error_names_the_fix(tmp_path, monkeypatch):
    qfile = write(tmp_path / "hover.json", hover_records()[:3])
    with pytest.raises(ValueError, match="corpus="):
        load_hover(qfile)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if `datasets` were not installed
    with pytest.raises(ValueError, match="hover:/path"):
        load_multihop("hover:hub")


def test_corpus_jsonl(tmp_path):
    path = write(tmp_path / "c.jsonl", [{"title": "A", "text": "x  y"}, {"title": "B", "text": ["s1", " s2"]}], True)
    assert load_corpus_jsonl(path) == ["A | x y", "B | s1 s2"]
    bad = write(tmp_path / "bad.jsonl", [{"name": "A"}], True)
    with pytest.raises(ValueError, match="'title' and 'text'"):
        load_corpus_jsonl(bad)


def test_unknown_specs_and_formats_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="hotpotqa:"):
        load_multihop("squad:/x")
    with pytest.raises(ValueError, match="hotpotqa:"):
        load_multihop("hotpotqa")
    qfile = write(tmp_path / "q.json", [{"id": 1, "query": "?"}])
    with pytest.raises(ValueError, match=r"HotpotQA.*supporting_facts"):
        load_hotpotqa(qfile)
    with pytest.raises(ValueError, match=r"MuSiQue.*paragraphs"):
        load_musique(qfile)
    with pytest.raises(ValueError, match=r"HoVer.*hpqa_id"):
        load_hover(qfile, corpus=qfile)
    with pytest.raises(ValueError, match="exceed"):
        load_hotpotqa(write(tmp_path / "h.json", [hotpot_record(0)]), train_size=2, dev_size=0)


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared real samples not present at /work/shared/data")
@pytest.mark.parametrize(("spec", "corpus_size"), [("hotpotqa", 994), ("musique", 1890)])
def test_shared_real_samples(spec, corpus_size):
    folder = SHARED / f"{spec}_train100"
    data = load_multihop(f"{spec}:{folder}")
    examples = data.train + data.dev + data.test
    assert len(examples) == 100 and (len(data.train), len(data.dev), len(data.test)) == (60, 20, 20)
    assert data.missing_gold() == []
    assert len({passage_title(p) for p in data.corpus}) <= len(data.corpus) <= corpus_size
    assert all(1 <= len(ex.titles) <= 4 for ex in examples)  # MuSiQue: 2 questions' gold paragraphs share a title
