"""`espalier eval` end to end through the real CLI: a tiny model, a tiny HotpotQA file, recall checked by hand."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from espalier.recipes.multihop.eval_job import EvalOptions, resolve_target
from espalier.recipes.multihop.manifest import RunManifest

pytestmark = pytest.mark.slow

# Three passages in all (the questions' own paragraphs); "Zoupous" is gold but in no passage.
# With num_docs=3 every search returns all three, whatever the model writes as a query, so
# recall is fixed: question 1 finds both gold titles (1.0), question 2 one of two (0.5).
QUESTIONS = [
    {"_id": "q1", "question": "Where was the architect of Tragis Hall born?", "answer": "Kewar",
     "supporting_facts": [["Tragis Hall", 0], ["Daito Thovir", 0]],
     "context": [["Tragis Hall", ["Tragis Hall was designed by Daito Thovir."]],
                 ["Daito Thovir", ["Daito Thovir was born in Kewar."]],
                 ["Koukisk Hall", ["Koukisk Hall is a concert hall."]]]},
    {"_id": "q2", "question": "Which river flows through the city where Zoupous studied?", "answer": "Wihix",
     "supporting_facts": [["Koukisk Hall", 0], ["Zoupous", 0]],
     "context": [["Koukisk Hall", ["Koukisk Hall is a concert hall."]]]},
]  # fmt: skip


def _manifest(model: str, data: str) -> RunManifest:
    return RunManifest(model=model, adapter="fieldwise", data=data, corpus=None, seed=0, train_size=0, dev_size=0,
                       num_docs=3, num_hops=2, max_tokens=4, val_temperature=0.0, engine="transformers",
                       num_inference_gpus=0)  # fmt: skip


def test_eval_writes_per_example_results_with_hand_checked_recall(tiny_llama_factory, tmp_path):
    questions = tmp_path / "hotpot.json"
    questions.write_text(json.dumps(QUESTIONS))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _manifest(str(tiny_llama_factory(seed=0)), f"hotpotqa:{questions}").write(run_dir)
    cmd = [sys.executable, "-m", "espalier.cli", "eval", str(run_dir), "--split", "all", "--threads", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "=== espalier eval: checkpoint base on hotpotqa:" in done.stdout
    assert "recall:            75.0%" in done.stdout and "format failures:   0.0%" in done.stdout

    out = run_dir / "eval" / "base-hotpotqa-hotpot-all.jsonl"
    assert str(out) in done.stdout
    rows = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["claim"])
    assert [set(r) for r in rows] == [{"index", "claim", "queries", "retrieved_titles", "gold_titles", "score",
                                       "failure"}] * 2  # fmt: skip
    q1, q2 = sorted(rows, key=lambda r: r["gold_titles"] != ["Tragis Hall", "Daito Thovir"])
    assert (q1["score"], q2["score"]) == (1.0, 0.5)
    assert q2["gold_titles"] == ["Koukisk Hall", "Zoupous"] and q2["failure"] is None
    for row in rows:
        assert len(row["queries"]) == 2 and row["queries"][0] == row["claim"]  # hop 0 searches with the claim
        assert sorted(row["retrieved_titles"]) == ["Daito Thovir", "Koukisk Hall", "Tragis Hall"]


def test_eval_target_picks_the_best_checkpoint_and_explains_a_missing_one(tmp_path):
    run_dir = tmp_path / "run"
    adapter = run_dir / "server" / "checkpoints" / "step-4" / "adapter"
    adapter.mkdir(parents=True)
    manifest = _manifest("m", "synthetic")
    from dataclasses import replace

    replace(manifest, checkpoints={"step-4": "server/checkpoints/step-4/adapter"}, best_checkpoint="step-4").write(
        run_dir
    )
    target = resolve_target(EvalOptions(target=str(run_dir)))
    assert (target.checkpoint, target.adapter_dir) == ("step-4", adapter)
    assert resolve_target(EvalOptions(target=str(run_dir), checkpoint="base")).adapter_dir is None
    with pytest.raises(ValueError, match="no checkpoint 'step-9'.*known: base, step-4"):
        resolve_target(EvalOptions(target=str(run_dir), checkpoint="step-9"))
    program = tmp_path / "elsewhere" / "program.json"
    program.parent.mkdir()
    program.write_text(json.dumps({"generate_query.predict": {"lm": {"model": "openai/arbor:m@step-4"}}}))
    with pytest.raises(ValueError, match="pass --base-url"):
        resolve_target(EvalOptions(target=str(program), data="synthetic"))
    assert resolve_target(EvalOptions(target=str(program), data="synthetic", base_url="http://x/v1")).checkpoint == (
        "step-4"
    )
