"""The benchmark table writer, and two benchmark functions on tiny models: well-formed numbers."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.common import Section, Sizes, Table
from benchmarks.context import Bench
from benchmarks.report import as_json, markdown, markdown_table
from benchmarks.train_throughput import LORA
from benchmarks.training import espalier_steps, step_groups

MACHINE = {"host": "h", "cpu": "x86_64", "cores": 2, "torch_threads": 2, "memory_gib": 8.0,
           "accelerator": "none (CPU)", "device": "CPU",
           "versions": {"torch": "t", "vllm": "v", "transformers": "tf", "trl": "trl", "peft": "p", "dspy": "d"}}


def test_table_writer_renders_markdown_and_json():
    table = Table("Demo", ["system", "tokens/s"], [["a | b", "1.0"], ["c", "2.0"]], ["a note"])
    section = Section("demo", [table], {"x": float("nan"), "y": [1.5, float("inf")]}, seconds=3.0)
    text = markdown([section], MACHINE, "quick", "espalier bench --quick", "today")
    lines = markdown_table(table).splitlines()
    assert lines[0] == "### Demo" and markdown_table(table, "CPU").startswith("### [CPU] Demo")
    assert lines[2:4] == ["| system | tokens/s |", "| --- | ---: |"]
    assert lines[4] == "| a \\| b | 1.0 |"  # a pipe inside a cell is escaped
    assert "- a note" in lines and "## demo (CPU, 3 s)" in text and "2 cores" in text
    record = json.loads(as_json([section], MACHINE, "quick", "today"))  # NaN and inf become null
    assert record["sections"]["demo"]["data"] == {"x": None, "y": [1.5, None]}
    with pytest.raises(ValueError, match="every row needs 2 cells"):
        markdown_table(Table("Bad", ["a", "b"], [["only one"]]))


def test_espalier_training_steps_are_timed(tiny_llama_factory):
    sizes, model_dir = Sizes.tiny(), tiny_llama_factory(vocab_size=512, hidden_size=32)
    groups = step_groups(sizes, vocab=512, steps=2)
    assert sum(len(g.samples) for g in groups) == 2 * sizes.batch * sizes.accum
    result = espalier_steps(str(model_dir), [g.to_dict() for g in groups], sizes.batch, sizes.accum, LORA, 2)
    assert len(result["step_seconds"]) == 2
    assert all(math.isfinite(t) and t > 0 for t in result["step_seconds"])


def test_sync_section_on_a_tiny_model(tiny_llama_factory, tmp_path):
    from benchmarks import sync

    bench = Bench(Sizes.tiny(), model=str(tiny_llama_factory(seed=0)), engines=("transformers",), workdir=tmp_path)
    section = sync.run(bench)
    runs = section.data["runs"]
    assert len(runs) == 2 and len(section.tables[0].rows) == 2
    for run in runs.values():
        assert run["n"] >= 1 and 0 < run["export_s"] <= run["total_s"] < 120
    hot, full = runs.values()
    assert hot["n"] == Sizes.tiny().reps and full["n"] == Sizes.tiny().reps


def test_memory_section_sums_the_measured_peaks(tmp_path):
    from benchmarks import memory

    bench = Bench(Sizes.tiny(), workdir=tmp_path)
    bench.results = {
        "grpo_step": Section("grpo_step", [], {"memory_mb": {"server": 500.0, "engine": 3000.0, "trainer": 800.0}}),
        "training": Section("training", [], {"runs": {"TRL": {"peak_rss_mb": 900.0}}}),
        "rollouts": Section("rollouts", [], {"runs": {"generate": {"peak_rss_mb": 700.0}}}),
    }
    rows = memory.run(bench).tables[0].rows
    assert [r[1] for r in rows] == ["500", "3,000", "800", "4,300", "900", "700"]
    assert memory.peak_rss_mb() > 0  # this process, from /proc/self/status
