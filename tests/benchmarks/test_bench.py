"""The benchmark table writer, and two benchmark functions on tiny models: well-formed numbers."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.common import Section, Sizes, Table
from benchmarks.context import Bench
from benchmarks.report import as_json, markdown, markdown_table, merge
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


def test_a_partial_run_keeps_the_other_sections_with_their_origin():
    def page(when: str, names: list[str], own: str = "") -> str:
        sections = [Section(n, [Table(f"{n} at {when}", ["a"], [["1"]])], {}, seconds=1.0) for n in names]
        return markdown(sections, MACHINE, "quick", f"bench {when}", when).replace("## c (CPU, 1 s)\n", own, 1)

    old = page("monday", ["a", "b", "c"], own="## c (CPU, 1 s)\n\n_Measured sunday with `versus`._\n")
    merged = merge(page("tuesday", ["b"]), old)
    assert [line for line in merged.splitlines() if line.startswith("## ")] == [
        "## b (CPU, 1 s)", "## a (CPU, 1 s)", "## c (CPU, 1 s)"]  # this run's first, then the rest in order
    assert "b at tuesday" in merged and "b at monday" not in merged and "a at monday" in merged
    assert "_Measured monday with `bench monday` (quick mode), on CPU: x86_64, 2 cores" in merged  # a's origin
    assert merged.count("_Measured") == 2 and "_Measured sunday with `versus`._" in merged  # c says its own


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


def test_the_benchmarked_program_runs_as_the_job_does():
    from benchmarks.program import SAMPLING, job_adapter, make_lm
    from espalier.recipes.multihop.job import RunOptions, make_adapter, train_kwargs_for

    assert type(job_adapter()) is type(make_adapter(RunOptions().adapter))
    assert SAMPLING["temperature"] == RunOptions().temperature
    assert SAMPLING.items() <= train_kwargs_for(RunOptions()).items()  # what resolve_sampling compares
    lm = make_lm({"model": "m", "base_url": "http://localhost:1/v1"}, max_tokens=8)
    assert lm.kwargs["temperature"] == RunOptions().temperature


def test_jittered_metric_is_small_reproducible_and_shared_by_copies():
    import copy

    from benchmarks.program import JITTER, JitteredMetric

    def metric(example, pred, trace=None):
        return 0.5

    first, second = JitteredMetric(metric), JitteredMetric(metric)
    scores = [first(None, None) for _ in range(50)]
    assert scores == [second(None, None) for _ in range(50)]  # the same seed: the same sequence
    assert all(0.5 <= s < 0.5 + JITTER for s in scores) and len(set(scores)) == len(scores)
    assert copy.deepcopy(first) is first  # deep-copied programs keep drawing from one RNG


def test_jittered_rewards_make_the_trainer_compute_every_sequence(tiny_llama_factory):
    """`grpo_step.computed` agrees with the trainer's zero-advantage skip, so `optimizer_seconds` counts right."""
    from benchmarks.grpo_step import computed, optimizer_seconds, samples
    from benchmarks.program import JitteredMetric
    from espalier.config import TrainConfig
    from espalier.training import GRPOTrainer
    from espalier.types import Group, Sample

    model_dir = tiny_llama_factory(vocab_size=512, hidden_size=32)
    jitter = JitteredMetric(lambda example, pred, trace=None: 1.0)
    flat = [Sample((5, 6, 7, 8), (9, 10 + i), 1.0) for i in range(8)]
    alike = [Group(tuple(flat[i : i + 2]), key=f"g{i}") for i in range(0, 8, 2)]  # no reward variance
    jittered = [Group(tuple(Sample(x.prompt_ids, x.completion_ids, jitter(None, None)) for x in g.samples))
                for g in alike]
    assert not any(computed(alike)) and all(computed(jittered))
    kwargs = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "bf16": False, "beta": 0.0,
              "loss_type": "dapo", "lora_config": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}}
    trainer = GRPOTrainer(model_dir, TrainConfig.from_kwargs(kwargs))
    for groups, trains in ((alike, False), (jittered, True)):
        metrics = trainer.train_step(groups)
        computed_tokens = sum(m.extra["completion_tokens"] for m in metrics)  # 1 per step that computed none
        assert computed_tokens == (sum(len(x.completion_ids) for x in samples(groups)) if trains else len(metrics))
        status = {"metrics": [{"num_sequences": m.num_sequences, "tokens_per_second": m.tokens_per_second}
                              for m in metrics]}
        assert (optimizer_seconds(status, groups) > 0) == trains


def test_quick_sizes_keep_every_figure():
    from benchmarks.scaling import varied

    quick, full = Sizes.quick(), Sizes()
    assert quick.reps >= 2 and quick.scaling_reps >= 2 and quick.k * quick.G >= 4 and quick.val_claims >= 1
    assert len(quick.scaling) >= 3 and varied(quick.scaling) == "G and max new tokens"
    assert varied(full.scaling) == "k, G and max new tokens" and varied(((1, 2, 4),)) == "size"


def test_end_to_end_sections_use_the_jobs_engine(tmp_path):
    from espalier.inference.factory import pick_engine

    job = pick_engine("auto")
    assert Bench(Sizes.tiny(), engines=("vllm", "transformers"), workdir=tmp_path).grpo_engine == job
    assert Bench(Sizes.tiny(), engines=("other",), workdir=tmp_path).grpo_engine == "other"


def test_grpo_step_section_trains_every_sequence_on_a_tiny_model(tiny_llama_factory, tmp_path):
    """The whole section on a tiny random model and the transformers engine, the job's temperature:
    with the step's fieldwise adapter every run reaches the jittered metric, so every group has
    variance and every sequence trains."""
    from benchmarks import grpo_step
    from benchmarks.program import SAMPLING

    bench = Bench(Sizes.tiny(), model=str(tiny_llama_factory(seed=0)), engines=("transformers",), workdir=tmp_path)
    try:
        section = grpo_step.run(bench)
    finally:
        bench.close()
    table = section.tables[0]
    assert "FieldwiseChatAdapter" in table.title and f"temperature {SAMPLING['temperature']:g}" in table.title
    assert section.data["trained_share"] == 1.0 and section.data["parts"]["training: optimizer steps"] > 0
    assert section.data["parts"]["training: pre-update log-probs (ratios of later optimizer steps)"] >= 0
    assert all(h["groups/no_variance_share"] == 0.0 for h in section.data["history"])
    assert len(section.data["per_step"]) == Sizes.tiny().step_reps


def test_mismatch_section_on_a_tiny_model(tiny_llama_factory, tmp_path):
    """The trainer holds the served adapter and trains at lr 0: ratios stay 1; the sampler gap is measured per dtype."""
    from benchmarks import mismatch

    bench = Bench(Sizes.tiny(), model=str(tiny_llama_factory(seed=0)), engines=("transformers",), workdir=tmp_path)
    try:
        section = mismatch.run(bench)
    finally:
        bench.close()
    bf16, fp32 = section.data["rows"].values()
    assert bf16["tokens"] == fp32["tokens"] > 0
    assert fp32["ratio_max_deviation"] < 1e-6 and bf16["ratio_max_deviation"] < 1e-6  # same dropout masks
    # the engine's prefill precision follows the machine (precision.fast_bf16): a small gap to the sampler, never a
    # large one; the bf16 trainer never matches an fp32 sampler exactly
    assert fp32["mismatch_mean_abs_logprob"] < 0.05 and 0 < bf16["mismatch_mean_abs_logprob"] < 0.05


def test_roofline_work_counts_each_shared_prefix_once():
    from benchmarks.rollouts import work_tokens
    from espalier.types import LMCall, Rollout

    call = lambda prompt, completion: LMCall("p", 0, tuple(prompt), tuple(completion))  # noqa: E731
    runs = [Rollout(0, (call([1, 2, 3], [4, 5]), call([1, 2, 3, 4, 5, 6], [7])), 1.0),  # a continued call: +2
            Rollout(0, (call([1, 2, 9], [4]),), 0.0)]  # shares [1, 2]: +2
    assert work_tokens(runs) == 5 + 2 + 2


def test_ceiling_policies_bracket_the_first_search():
    from benchmarks.ceiling import POLICIES, policy_recall
    from espalier.recipes.multihop import BM25Retriever, load_multihop
    from espalier.recipes.multihop.metric import first_search_recall

    data = load_multihop("synthetic", seed=0, dev_size=40)
    search, dev = BM25Retriever(data.corpus), data.dev
    floor = first_search_recall(dev, search, 3)
    assert policy_recall(dev, search, 3, POLICIES["claim"]) == pytest.approx(floor)  # the same query finds nothing new
    assert policy_recall(dev, search, 3, POLICIES["bridge title"]) > floor + 0.2  # naming the bridge finds it
