"""The run report: curves from ArborGRPO's history, the files written, and the page in a real browser."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from espalier.history import Record, StepRecord, ValRecord
from espalier.recipes.multihop.manifest import RunManifest, saved_checkpoints
from espalier.recipes.multihop.report import Curves, ReportPage, write_report
from espalier.recipes.multihop.scoring import ExampleResult
from espalier.rollout.runner import EvalResult

START = 1000.0


def _history() -> list[Record]:
    step = {"groups/count": 4.0, "rollouts/format_failure_rate": 0.5, "time/train_s": 3.0}
    return [
        ValRecord(0, START + 30, 20.0, EvalResult(0.25, 0.75, 0.0, 4)),
        StepRecord(1, START + 90, {**step, "reward/mean": -0.4, "reward/std": 0.3, "groups/no_variance_share": 0.75,
                                   "time/rollouts_s": 50.0}),
        StepRecord(2, START + 150, {**step, "reward/mean": 0.1, "reward/std": 0.2, "groups/no_variance_share": 0.25,
                                    "time/rollouts_s": 55.0}),
        ValRecord(2, START + 180, 25.0, EvalResult(0.5, 0.0, 0.0, 4)),
    ]


def _example(index: int, score: float, queries: list[str]) -> ExampleResult:
    return ExampleResult(index, "Where was the architect of Tragis Hall born?", queries,
                         ["Tragis Hall", "Koukisk Hall", "Daito Thovir"], ["Tragis Hall", "Daito Thovir"], score,
                         None if score else "format: ChatAdapter could not parse fields followup_search_query")  # fmt: skip


def _page(tmp_path) -> ReportPage:
    before = [_example(0, 0.0, ["Where was the architect of Tragis Hall born?"])]
    after = [_example(0, 1.0, ["Where was the architect of Tragis Hall born?", "Daito Thovir architect"])]
    return ReportPage(run_dir=str(tmp_path), model="tiny", adapter="prefill", data="synthetic", total_steps=4,
                      curves=Curves.from_history(_history(), START, 0.2), finished=True, before=before, after=after,
                      after_label="returned program (step-2)")  # fmt: skip


def test_curves_from_history_hold_the_numbers_of_each_record():
    c = Curves.from_history(_history(), START)
    assert [(p.step, p.wall_s, p.reward_mean, p.reward_std) for p in c.steps] == [(1, 90, -0.4, 0.3), (2, 150, 0.1, 0.2)]
    assert [p.trained_share for p in c.steps] == [0.25, 0.75]  # 1 - share of groups whose rewards did not vary
    assert [(p.rollouts_s, p.train_s) for p in c.steps] == [(50.0, 3.0), (55.0, 3.0)]
    assert [(v.step, v.wall_s, v.recall, v.format_failure_rate, v.time_s) for v in c.validation] == [
        (0, 30, 0.25, 0.75, 20.0), (2, 180, 0.5, 0.0, 25.0)]  # fmt: skip
    assert c.best().step == 2


def test_report_writes_a_self_contained_page_its_plots_and_the_curves_json(tmp_path):
    path = write_report(tmp_path, _page(tmp_path))
    assert path == tmp_path / "report.html"
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"training.png", "validation.png", "time.png"}
    data = json.loads((tmp_path / "report.json").read_text())
    assert [s["reward_mean"] for s in data["steps"]] == [-0.4, 0.1]
    assert [v["recall"] for v in data["validation"]] == [0.25, 0.5]
    assert [v["wall_s"] for v in data["validation"]] == [30, 180]
    assert data["examples"]["after"][0]["queries"][1] == "Daito Thovir architect"
    html = path.read_text()
    assert html.count("data:image/png;base64,") == 3
    assert "http://" not in html and "https://" not in html  # nothing fetched from the network
    assert "25.0% → 50.0%" in html  # dev recall baseline -> best
    assert data["first_search_recall"] == 0.2 and "+30.0 points" in html  # best 50% over the 20% first-search floor
    assert "<span class='gold'>Daito Thovir</span>" in html and "returned program (step-2)" in html


def _browser() -> str | None:
    found = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if found is None and os.environ.get("ESPALIER_TEST_BROWSER") == "required":
        pytest.fail("no chromium on PATH, and ESPALIER_TEST_BROWSER=required (.ci/run installs it with apt-get)")
    return found


def test_report_renders_in_a_headless_browser(tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("chromium is not installed (`apt-get install -y chromium`; .ci/run installs it)")
    import numpy as np
    from PIL import Image

    path = write_report(tmp_path, _page(tmp_path))
    shot = tmp_path / "screenshot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,2400",
           f"--screenshot={shot}", path.as_uri()]  # fmt: skip
    subprocess.run(cmd, capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)  # (H * W, 3)
    inked = float((pixels.min(axis=1) < 200).mean())
    assert inked > 0.03, f"the page looks blank ({inked:.1%} of the screenshot is not white)"
    assert len(np.unique(pixels, axis=0)) > 200  # text, plots and table, not one flat colour


def test_manifest_round_trip_and_its_checkpoints(tmp_path):
    adapter = tmp_path / "server" / "checkpoints" / "step-10" / "adapter"
    adapter.mkdir(parents=True)
    (tmp_path / "server" / "checkpoints" / "step-5" / "adapter").mkdir(parents=True)
    saved = saved_checkpoints(tmp_path)
    assert list(saved) == ["step-5", "step-10"]  # in step order: the last is the latest
    job = tmp_path / "other" / "server" / "checkpoints" / "grpo-1"
    for name in ("step-10", "step-5", ".last"):
        (job / name / "adapter").mkdir(parents=True)
    assert saved_checkpoints(tmp_path / "other") == {  # a job's checkpoints, as the server names them
        f"grpo-1/{n}": f"server/checkpoints/grpo-1/{n}/adapter" for n in ("step-5", "step-10")}
    per_job = RunManifest(model="m", adapter="prefill", data="synthetic", corpus=None, seed=1, train_size=0,
                          dev_size=40, num_docs=3, num_hops=2, max_tokens=64, val_temperature=0.0, engine="auto",
                          num_inference_gpus=0, checkpoints=saved_checkpoints(tmp_path / "other"),
                          best_checkpoint="grpo-1/step-10")  # fmt: skip
    assert per_job.adapter_dir(tmp_path / "other", "step-5") == job / "step-5" / "adapter"  # the short name
    m = RunManifest(model="m", adapter="prefill", data="synthetic", corpus=None, seed=1, train_size=0, dev_size=40,
                    num_docs=3, num_hops=2, max_tokens=64, val_temperature=0.0, engine="auto", num_inference_gpus=0,
                    checkpoints=saved, best_checkpoint="step-10")  # fmt: skip
    m.write(tmp_path)
    back = RunManifest.read(tmp_path)
    assert back == m and back.adapter_dir(tmp_path, "step-10") == adapter and back.adapter_dir(tmp_path, "base") is None
    with pytest.raises(ValueError, match="known: base, step-5, step-10"):
        back.adapter_dir(tmp_path, "step-7")
    raw = json.loads((tmp_path / "run.json").read_text())
    (tmp_path / "run.json").write_text(json.dumps({**raw, "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        RunManifest.read(tmp_path)
