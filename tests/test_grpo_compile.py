"""ArborGRPO end to end: a real Espalier server (subprocess, transformers engine), a tiny model,
real DSPy programs, real training steps.

The tiny model is random, so it writes random tokens: that is enough to check the plumbing
(what is sampled is what is trained, nothing is dropped, failures are data, the best
checkpoint is returned). Learning itself is tested in tests/training/test_learning.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import dspy
import httpx
import pytest

import espalier
from espalier import ArborGRPO, ArborProvider
from espalier.history import steps, validations
from espalier.program.adapter import PrefillChatAdapter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_llama_factory, tmp_path_factory):
    model_dir = tiny_llama_factory(seed=0)  # the default model's tokenizer and chat template
    run_dir = tmp_path_factory.mktemp("server")
    info = espalier.init(model=str(model_dir), engine="transformers", run_dir=run_dir, record_trained=True)
    yield {**info, "run_dir": run_dir}
    from espalier.inference.launch import shutdown

    shutdown()


def _lm(server, **kw) -> dspy.LM:
    return dspy.LM(
        model=f"openai/arbor:{server['model']}",
        provider=ArborProvider(),
        api_base=server["base_url"],
        api_key=server["api_key"] or "local",
        temperature=1.0,
        top_p=1.0,
        top_k=-1,
        repetition_penalty=1.0,
        max_tokens=kw.pop("max_tokens", 6),
        num_retries=0,
        **kw,
    )


class Draft(dspy.Module):
    """Two one-field predictors: with the prefilled header every completion parses."""

    def __init__(self, retries: int = 0):
        super().__init__()
        self.draft = dspy.Predict("question -> answer")
        self.check = dspy.Predict("question, answer -> verdict")
        self.retries = retries

    def forward(self, question: str):
        answer = self.draft(question=question).answer
        for _ in range(self.retries):  # a variably invoked predictor: retry while the answer is "too long"
            if len(answer) % 3 == 0:
                break
            answer = self.draft(question=question + answer[:5]).answer
        verdict = self.check(question=question, answer=answer).verdict
        return dspy.Prediction(answer=answer, verdict=verdict)


def _varied(example, pred, trace=None) -> float:
    """A reward that differs between random completions, so groups have variance."""
    return (sum(map(ord, pred.answer + pred.verdict)) % 7) / 6


def _examples(n: int, prefix: str = "q") -> list[dspy.Example]:
    return [dspy.Example(question=f"{prefix} {i}?").with_inputs("question") for i in range(n)]


def _trained(server, run_dir_name: str | None = None) -> list[dict]:
    """The sequences the trainer fed to the model, as it recorded them (`--record-trained`)."""
    files = sorted((Path(server["run_dir"]) / "trained").glob("*.jsonl"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


def test_sampled_tokens_are_trained_and_nothing_is_dropped(server, tmp_path):
    program = Draft()
    program.set_lm(_lm(server))
    k, G = 2, 3
    compiler = ArborGRPO(
        metric=_varied,
        num_dspy_examples_per_grpo_step=k,
        num_rollouts_per_grpo_step=G,
        num_train_steps=1,
        num_threads=4,
        use_train_as_val=False,
        checkpoint="none",
        exclude_demos=True,
        adapter=PrefillChatAdapter(),
        train_kwargs={"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 1e-3},
        run_dir=str(tmp_path),
    )
    sent = []
    compiler.on_groups = sent.extend  # the groups of each step, as sent to the job
    before = len(_trained(server))
    compiler.compile(student=program, trainset=_examples(4))
    trained = _trained(server)[before:]

    calls_per_run = 2
    assert sum(len(g.samples) for g in sent) == k * G * calls_per_run
    step = steps(compiler.history)[0]
    assert step.metrics["groups/sequences"] == k * G * calls_per_run
    sampled = sorted((list(s.prompt_ids), list(s.completion_ids)) for g in sent for s in g.samples)
    assert sorted((t["prompt_ids"], t["completion_ids"]) for t in trained) == sampled


def test_prompts_trained_are_the_prefilled_chat_prompts(server, tmp_path):
    """The trainer's prompt ends with the prefilled header: the same adapter sampled and trained."""
    program = Draft()
    program.set_lm(_lm(server))
    compiler = ArborGRPO(metric=_varied, num_dspy_examples_per_grpo_step=1, num_rollouts_per_grpo_step=2,
                         num_train_steps=1, checkpoint="none", adapter=PrefillChatAdapter(), run_dir=str(tmp_path))
    sent = []
    compiler.on_groups = sent.extend
    compiler.compile(student=program, trainset=_examples(1))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(server["model"])
    prompt = tokenizer.decode(sent[0].samples[0].prompt_ids)
    assert prompt.rstrip().endswith("[[ ## answer ## ]]")


def test_grouping_modes_with_a_variably_invoked_predictor(server, tmp_path):
    program = Draft(retries=2)  # `draft` runs 1 to 3 times, depending on what was sampled
    program.set_lm(_lm(server))
    for mode in ("truncate", "ragged", "fill"):
        compiler = ArborGRPO(
            metric=_varied, num_dspy_examples_per_grpo_step=2, num_rollouts_per_grpo_step=4, num_train_steps=1,
            checkpoint="none", adapter=PrefillChatAdapter(), variably_invoked_predictor_grouping_mode=mode,
            variably_invoked_predictor_fill_strategy="max" if mode == "fill" else None, run_dir=str(tmp_path / mode),
        )
        sent, rollouts = [], []
        compiler.on_groups, compiler.on_rollouts = sent.extend, rollouts.extend
        compiler.compile(student=program, trainset=_examples(2, "again"))
        calls = [sum(c.predictor == "draft" for c in r.calls) for r in rollouts]
        draft_groups = [g for g in sent if "/draft/" in g.key]
        trained = sum(len(g.samples) for g in draft_groups)
        if mode == "ragged":
            assert trained == sum(calls)
        else:
            assert all(len(g.samples) == 4 for g in draft_groups)  # every run fills every slot it keeps
        if mode == "truncate":
            assert trained <= sum(calls)
        if mode == "fill":
            assert trained >= sum(calls)
    assert len(set(calls)) > 1  # the predictor really was invoked a varying number of times


def test_format_failures_and_errors_are_scored_and_still_trained(server, tmp_path):
    class Flaky(dspy.Module):
        def __init__(self):
            super().__init__()
            self.think = dspy.ChainOfThought("question -> answer")  # random tokens never close `reasoning`

        def forward(self, question):
            if question.endswith("3?"):
                raise ConnectionError("retriever down")
            return self.think(question=question)

    program = Flaky()
    program.set_lm(_lm(server))
    compiler = ArborGRPO(metric=_varied, num_dspy_examples_per_grpo_step=4, num_rollouts_per_grpo_step=2,
                         num_train_steps=1, checkpoint="none", adapter=PrefillChatAdapter(), failure_score=0.0,
                         format_failure_score=-1.0, run_dir=str(tmp_path), seed=1)
    sent, rollouts = [], []
    compiler.on_groups = sent.extend
    compiler.on_rollouts = rollouts.extend
    compiler.compile(student=program, trainset=_examples(4))
    errors = [r for r in rollouts if r.failure and r.failure.startswith("error")]
    formats = [r for r in rollouts if r.failure and r.failure.startswith("format")]
    assert len(errors) == 2 and all(r.reward == 0.0 and "retriever down" in r.failure for r in errors)
    assert len(formats) == 6 and all(-1.0 <= r.reward <= -0.5 for r in formats)  # reasoning parsed or not
    assert sum(len(g.samples) for g in sent) == 6  # the failed-format calls are trained; the errored runs made none


def test_steps_whose_runs_all_fail_stop_the_run_with_the_reason(server, tmp_path):
    """A dead dependency fails every run: three such steps in a row stop compile instead of 'training' on nothing."""
    from espalier.grpo import RolloutError

    class Down(dspy.Module):
        def __init__(self):
            super().__init__()
            self.think = dspy.Predict("question -> answer")

        def forward(self, question):
            raise ConnectionError("connection refused")

    program = Down()
    program.set_lm(_lm(server))
    compiler = ArborGRPO(metric=_varied, num_dspy_examples_per_grpo_step=2, num_rollouts_per_grpo_step=2,
                         num_train_steps=10, checkpoint="none", run_dir=str(tmp_path))
    with pytest.raises(RolloutError, match="3 consecutive steps.*connection refused"):
        compiler.compile(student=program, trainset=_examples(2))
    done = steps(compiler.history)
    assert len(done) == 3 and all(r.metrics["rollouts/errors"] == 4 and r.metrics["groups/count"] == 0 for r in done)


def test_returns_the_best_checkpoint_not_the_last(server, tmp_path):
    program = Draft()
    program.set_lm(_lm(server))
    scores = iter([0.1, 0.9, 0.2])  # validations at steps 0, 2 and 4: the best is at step 2
    compiler = ArborGRPO(
        metric=_varied, num_dspy_examples_per_grpo_step=1, num_rollouts_per_grpo_step=2, num_train_steps=4,
        num_steps_for_val=2, checkpoint="single-best", adapter=PrefillChatAdapter(), run_dir=str(tmp_path),
        train_kwargs={"learning_rate": 0.5, "per_device_train_batch_size": 2},
    )
    compiler.validation_score = lambda result: next(scores)  # arranged scores; the runs are real
    saved = Path(server["run_dir"]) / "checkpoints"
    seen = []  # on_validation runs after each validation, once its checkpoint is saved
    compiler.on_validation = lambda step, result: seen.append(
        (step, result.num_examples, any(saved.glob("*/step-2/adapter/adapter_config.json"))))
    optimized = compiler.compile(student=program, trainset=_examples(2), valset=_examples(2, "v"))

    assert seen[0][:2] == (0, 2) and seen[1:] == [(2, 2, True), (4, 2, True)]
    stamps = [r.timestamp for r in compiler.history]
    assert stamps == sorted(stamps) and all(r.time_s > 0 for r in validations(compiler.history))
    model = optimized.predictors()[0].lm.model
    job_id = model.split("@")[1].split("/")[0]
    assert model == f"openai/arbor:{server['model']}@{job_id}/step-2"  # this job's step 2, no other job's
    status = httpx.get(f"{server['base_url']}models", headers={"Authorization": f"Bearer {server['api_key']}"})
    assert f"{server['model']}@{job_id}/step-2" in [m["id"] for m in status.json()["data"]]

    def logprobs(name: str) -> list[float]:
        body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0,
                "logprobs": True}
        r = httpx.post(f"{server['base_url']}/chat/completions", json=body,
                       headers={"Authorization": f"Bearer {server['api_key']}"}, timeout=60)
        return [t["logprob"] for t in r.json()["choices"][0]["logprobs"]["content"]]

    assert logprobs(f"{server['model']}@{job_id}/step-2") != logprobs(server["model"])  # step 2 is not the last policy
    with dspy.context(adapter=PrefillChatAdapter()):
        assert optimized(question="q 0?").answer is not None  # the returned program runs on the best adapter


def test_stop_request_ends_training_gracefully(server, tmp_path):
    program = Draft()
    program.set_lm(_lm(server))
    compiler = ArborGRPO(metric=_varied, num_dspy_examples_per_grpo_step=1, num_rollouts_per_grpo_step=2,
                         num_train_steps=1000, checkpoint="last", adapter=PrefillChatAdapter(), run_dir=str(tmp_path))
    compiler.on_groups = lambda groups: compiler.request_stop() if len(compiler.history) >= 2 else None
    optimized = compiler.compile(student=program, trainset=_examples(2))
    assert 2 <= len(steps(compiler.history)) <= 3
    assert optimized.predictors()[0].lm.model.endswith("/last")


def test_reference_recipe_runs_verbatim(server, tmp_path, monkeypatch):
    """DSPy's multi-hop recipe as the user writes it, its LM line too (no API key): only the import line and GPU
    counts differ."""
    from espalier.recipes.multihop import BM25Retriever, ResearchHop, generate_world, recall

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # runs/ goes here
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # the recipe sets no key, and neither does its user
    data = generate_world(seed=0, train_size=12, dev_size=3, test_size=0, scale=0.2)
    trainset, devset = data.train, data.dev
    model = server["model"]
    local_lm = dspy.LM(model=f"openai/arbor:{model}", provider=ArborProvider(), api_base=server["base_url"],
                       temperature=1.0, top_p=1.0, top_k=-1, repetition_penalty=1.0, max_tokens=4)  # the recipe's line
    search = BM25Retriever(data.corpus)
    from espalier.recipes.multihop import set_search

    set_search(search)  # the tutorial's program reads a module-level search

    # ---- verbatim from the recipe (ARCHITECTURE.md section 1), GPU counts 0 ----
    program = ResearchHop(num_docs=4, num_hops=2)
    program.set_lm(local_lm)

    train_kwargs = {
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 24/6,
        "temperature": 1.0, "top_k": -1, "top_p": 1.0, "repetition_penalty": 1.0,
        "beta": 0.00, "learning_rate": 1e-6, "gradient_checkpointing": True, "bf16": True,
        "lr_scheduler_type": "constant_with_warmup", "loss_type": "dapo", "max_steps": 1000,
        "report_to": "wandb", "log_completions": True, "logging_steps": 1,
        "max_prompt_length": None, "max_completion_length": None, "scale_rewards": False,
        "max_grad_norm": 1.0,
        "lora_config": {"lora_alpha": 16, "lora_dropout": 0.05, "r": 8,
                        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                           "up_proj", "down_proj", "gate_proj"]},
        "num_training_gpus": 0, "num_inference_gpus": 0, "weight_decay": 0.001,
    }
    compiler = ArborGRPO(metric=recall, num_dspy_examples_per_grpo_step=6,
                         num_rollouts_per_grpo_step=24, exclude_demos=True, num_train_steps=1000,
                         num_threads=16, use_train_as_val=False, num_steps_for_val=50,
                         train_kwargs=train_kwargs, checkpoint="single-best")
    compiler.on_groups = lambda groups: compiler.request_stop() if len(compiler.history) >= 2 else None  # not verbatim: stop after two steps
    with dspy.context(adapter=PrefillChatAdapter()):
        optimized_program = compiler.compile(student=program, trainset=trainset, valset=devset)
    # ---- end of the recipe's code ----
    set_search(None)

    done = steps(compiler.history)
    assert len(done) == 2
    assert all(r.metrics["groups/sequences"] >= 6 * 24 for r in done)  # at least one call per run, all trained
    assert [r.step for r in validations(compiler.history)] == [0, 2]
    assert optimized_program.predictors()[0].lm.model.startswith(f"openai/arbor:{server['model']}@")


def test_saved_program_is_served_again_by_a_new_server(server, tmp_path):
    """compile -> program.save -> `espalier serve --adapter <checkpoint>` -> program.load: same policy."""
    program = Draft()
    program.set_lm(_lm(server))
    compiler = ArborGRPO(metric=_varied, num_dspy_examples_per_grpo_step=1, num_rollouts_per_grpo_step=2,
                         num_train_steps=1, checkpoint="last", adapter=PrefillChatAdapter(), run_dir=str(tmp_path),
                         train_kwargs={"learning_rate": 0.5, "per_device_train_batch_size": 2})
    compiled = compiler.compile(student=program, trainset=_examples(1))
    compiled.save(str(tmp_path / "program.json"))
    job_id = compiled.predictors()[0].lm.model.split("@")[1].split("/")[0]
    checkpoint = Path(server["run_dir"]) / "checkpoints" / job_id / "last" / "adapter"
    again = espalier.init(model=server["model"], engine="transformers", run_dir=tmp_path / "again", adapter=checkpoint)

    reloaded = Draft()
    reloaded.load(str(tmp_path / "program.json"))
    model = reloaded.predictors()[0].lm.model
    assert model == f"openai/arbor:{server['model']}@{job_id}/last"

    def logprobs(info) -> list[float]:
        body = {"model": model.removeprefix("openai/"), "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4, "temperature": 0, "logprobs": True}
        headers = {"Authorization": f"Bearer {info['api_key']}"} if info["api_key"] else {}
        r = httpx.post(f"{info['base_url']}/chat/completions", json=body, headers=headers, timeout=60)
        r.raise_for_status()
        return [t["logprob"] for t in r.json()["choices"][0]["logprobs"]["content"]]

    assert logprobs(again) == pytest.approx(logprobs(server), abs=1e-4)
    for predictor in reloaded.predictors():
        predictor.lm = predictor.lm.copy(api_base=again["base_url"], api_key=again["api_key"] or "local")
    with dspy.context(adapter=PrefillChatAdapter()):
        assert reloaded(question="q 0?").verdict is not None


def test_fieldwise_adapter_never_fails_the_format_and_trains_each_field_call(server, tmp_path):
    from espalier.program.adapter import FieldwiseChatAdapter

    program = dspy.ChainOfThought("question -> answer")  # two output fields: reasoning, answer
    program.set_lm(_lm(server))
    compiler = ArborGRPO(metric=lambda ex, pred, trace=None: float(len(pred.answer) % 2), num_train_steps=1,
                         num_dspy_examples_per_grpo_step=2, num_rollouts_per_grpo_step=3, checkpoint="none",
                         adapter=FieldwiseChatAdapter(), run_dir=str(tmp_path))
    rollouts, sent = [], []
    compiler.on_rollouts, compiler.on_groups = rollouts.extend, sent.extend
    compiler.compile(student=program, trainset=_examples(2))

    assert all(r.failure is None for r in rollouts)  # random tokens, and still every run parses
    assert all([c.invocation for c in r.calls] == [0, 1] for r in rollouts)  # one call per field
    assert sum(len(g.samples) for g in sent) == 2 * 3 * 2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(server["model"])
    second = tokenizer.decode(rollouts[0].calls[1].prompt_ids)
    assert second.rstrip().endswith("[[ ## answer ## ]]") and "[[ ## reasoning ## ]]" in second


def test_a_json_fallback_retry_is_not_the_predictors_next_invocation(server, tmp_path):
    """DSPy's ChatAdapter (fallback on): every parse of the random model fails and is retried through JSONAdapter.
    The retry is left out and counted; each group holds the ChatAdapter prompts of one invocation."""
    program = Draft()
    program.set_lm(_lm(server))
    compiler = ArborGRPO(metric=_varied, num_dspy_examples_per_grpo_step=2, num_rollouts_per_grpo_step=2,
                         num_train_steps=1, checkpoint="none", adapter=dspy.ChatAdapter(), run_dir=str(tmp_path))
    assert compiler.adapter is None or compiler.adapter.use_json_adapter_fallback
    rollouts, sent = [], []
    compiler.on_rollouts, compiler.on_groups = rollouts.extend, sent.extend
    compiler.compile(student=program, trainset=_examples(2))

    assert all(r.failure and r.failure.startswith("format") for r in rollouts)  # `draft` never parses
    assert all([(c.predictor, c.invocation) for c in r.calls] == [("draft", 0)] for r in rollouts)
    assert all(r.fallback_calls == 1 for r in rollouts)
    step = steps(compiler.history)[0].metrics
    assert step["rollouts/json_fallback_calls"] == 4 and step["groups/sequences"] == 4
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(server["model"])
    for group in sent:
        assert len({s.prompt_ids for s in group.samples}) == 1  # one prompt per group: the same invocation
        assert "[[ ## question ## ]]" in tokenizer.decode(group.samples[0].prompt_ids)  # ChatAdapter's, not JSON's
