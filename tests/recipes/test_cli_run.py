"""`espalier run multihop` end to end through the real CLI, on a tiny model, for one step."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_run_multihop_one_step_prints_and_writes_a_summary(tiny_llama_factory, tmp_path):
    model = tiny_llama_factory(seed=0)  # a random model with the default model's tokenizer
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "espalier.cli", "run", "multihop", "--model", str(model), "--engine", "transformers",
           "--steps", "1", "--examples-per-step", "2", "--rollouts-per-example", "2", "--train-size", "4",
           "--dev-size", "2", "--max-tokens", "4", "--threads", "4", "--adapter", "fieldwise", "--run-dir", str(run_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "=== espalier run multihop: summary ===" in out
    assert "dev recall:" in out and "format failures:" in out
    assert "step 1/1:" in out and "validation @ step 0" in out

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 1
    assert 0.0 <= summary["baseline_dev_recall"] <= 1.0 and 0.0 <= summary["final_dev_recall"] <= 1.0
    assert [v["step"] for v in summary["validation"]] == [0, 1]
    assert summary["options"]["adapter"] == "fieldwise"
    assert summary["baseline_format_failure_rate"] == 0.0  # fieldwise: the adapter writes the headers
    assert (run_dir / "program.json").exists() and (run_dir / "metrics.jsonl").exists()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("reward/mean" in m for m in metrics)


def test_bad_data_spec_is_a_clear_error(tmp_path):
    cmd = [sys.executable, "-m", "espalier.cli", "run", "multihop", "--data", "squad:nowhere", "--run-dir",
           str(tmp_path / "r")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode != 0
    assert "hotpotqa:" in done.stderr + done.stdout  # the error names the accepted forms
