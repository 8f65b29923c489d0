"""`espalier run multihop` end to end through the real CLI, on a tiny model, for one step."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def one_step_run(tiny_llama_factory, tmp_path_factory):
    """One `espalier run multihop` step on a tiny model: (the finished process, its run directory)."""
    model = tiny_llama_factory(seed=0)  # a random model with the default model's tokenizer
    tmp_path = tmp_path_factory.mktemp("cli-run")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "espalier.cli", "run", "multihop", "--model", str(model), "--engine", "transformers",
           "--steps", "1", "--examples-per-step", "2", "--rollouts-per-example", "2", "--train-size", "4",
           "--dev-size", "2", "--max-tokens", "4", "--threads", "4", "--adapter", "fieldwise", "--inference-replicas", "2", "--run-dir", str(run_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done, run_dir


def test_run_multihop_one_step_prints_and_writes_a_summary(one_step_run):
    done, run_dir = one_step_run
    out = done.stdout
    assert "=== espalier run multihop: summary ===" in out
    assert "dev recall:" in out and "format failures:" in out
    assert "step 1/1:" in out and "validation @ step 0" in out
    assert f"report:            {run_dir / 'report.html'}" in out

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 1
    assert 0.0 <= summary["baseline_dev_recall"] <= 1.0 and 0.0 <= summary["final_dev_recall"] <= 1.0
    assert [v["step"] for v in summary["validation"]] == [0, 1]
    assert summary["options"]["adapter"] == "fieldwise"
    assert "engine: ReplicaSet, 2 replica(s)" in (run_dir / "server" / "server.log").read_text()
    assert summary["baseline_format_failure_rate"] == 0.0  # fieldwise: the adapter writes the headers
    assert (run_dir / "program.json").exists() and (run_dir / "metrics.jsonl").exists()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("reward/mean" in m for m in metrics)


def test_run_writes_the_report_and_what_eval_needs(one_step_run):
    _, run_dir = one_step_run
    summary = json.loads((run_dir / "summary.json").read_text())
    report = json.loads((run_dir / "report.json").read_text())
    assert report["finished"] is True
    assert [v["recall"] for v in report["validation"]] == [v["score"] for v in summary["validation"]]
    assert [s["reward_mean"] for s in report["steps"]] == [summary["train_reward_first"]]
    assert report["validation"][0]["wall_s"] <= report["steps"][0]["wall_s"] <= report["validation"][1]["wall_s"]
    assert len(report["examples"]["before"]) == len(report["examples"]["after"]) == 2  # the whole (tiny) dev set
    assert "data:image/png;base64," in (run_dir / "report.html").read_text()
    assert {p.name for p in (run_dir / "plots").iterdir()} == {"training.png", "validation.png", "time.png"}
    manifest = json.loads((run_dir / "run.json").read_text())
    best = summary["served_model"].split("@")[1]
    assert (manifest["version"], manifest["adapter"], manifest["data"], manifest["dev_size"]) == (1, "fieldwise",
                                                                                                  "synthetic", 2)
    assert manifest["best_checkpoint"] == best and (best == "base" or best in manifest["checkpoints"])
    assert all((run_dir / path / "adapter_config.json").exists() for path in manifest["checkpoints"].values())


def test_eval_scores_the_runs_best_checkpoint_on_its_dev_set(one_step_run):
    _, run_dir = one_step_run
    cmd = [sys.executable, "-m", "espalier.cli", "eval", str(run_dir), "--threads", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=run_dir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    best = json.loads((run_dir / "run.json").read_text())["best_checkpoint"]
    rows = [json.loads(line) for line in (run_dir / "eval" / f"{best}-synthetic-dev.jsonl").read_text().splitlines()]
    report = json.loads((run_dir / "report.json").read_text())
    assert [r["claim"] for r in rows] == [r["claim"] for r in report["examples"]["before"]]  # the run's dev set
    recall = sum(r["score"] for r in rows) / len(rows)
    assert f"recall:            {100 * recall:.1f}%" in done.stdout


def test_bad_data_spec_is_a_clear_error(tmp_path):
    cmd = [sys.executable, "-m", "espalier.cli", "run", "multihop", "--data", "squad:nowhere", "--run-dir",
           str(tmp_path / "r")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode != 0
    assert "hotpotqa:" in done.stderr + done.stdout  # the error names the accepted forms


def test_resume_goes_on_with_the_run_and_its_options(one_step_run):
    """`--resume RUN_DIR` of a run whose steps are all done: the same options, the same job and best checkpoint,
    no step trained again (kill -9 mid-run and resume: tests/test_resume.py)."""
    done, run_dir = one_step_run
    before = json.loads((run_dir / "summary.json").read_text())
    cmd = [sys.executable, "-m", "espalier.cli", "run", "multihop", "--resume", str(run_dir)]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=run_dir.parent)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    after = json.loads((run_dir / "summary.json").read_text())
    assert after["options"] == {**before["options"], "resume": str(run_dir)}
    assert after["served_model"] == before["served_model"]
    assert "resuming" in again.stdout + again.stderr and after["validation"] == before["validation"]
