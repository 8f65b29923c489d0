"""DSPy's own `dspy.teleprompt.grpo.GRPO` drives an Espalier server (tiny model, real GRPOTrainer) for two steps."""

from __future__ import annotations

from dataclasses import replace

import dspy
import pytest
from serving_fixtures import API_KEY, MODEL_ID, start_server, stop_server

from espalier.program.provider import ArborProvider

pytestmark = pytest.mark.slow

TRAIN_KWARGS = {
    "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
    "temperature": 1.0, "top_k": -1, "top_p": 1.0, "repetition_penalty": 1.0, "beta": 0.0,
    "lora_config": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "num_training_gpus": 0, "num_inference_gpus": 0, "max_completion_length": 64,
}


def test_dspy_grpo_runs_two_steps(tiny_chat_dir, tmp_path):
    from dspy.teleprompt.grpo import GRPO

    served, server = start_server(tiny_chat_dir, tmp_path / "run")
    try:
        lm = dspy.LM(f"openai/arbor:{MODEL_ID}", provider=ArborProvider(), api_base=f"{server.url}/v1",
                     api_key=API_KEY, temperature=1.0, max_tokens=16, cache=False)
        program = dspy.Predict("question -> answer")
        program.set_lm(lm)
        trainset = [dspy.Example(question=f"What is {i} + {i}?", answer=str(2 * i)).with_inputs("question")
                    for i in range(3)]
        compiler = GRPO(metric=lambda ex, pred, trace=None: float(getattr(pred, "answer", "") == ex.answer),
                        num_dspy_examples_per_grpo_step=1, num_rollouts_per_grpo_step=2, num_train_steps=2,
                        num_threads=2, exclude_demos=True, train_kwargs=TRAIN_KWARGS, num_steps_for_val=10)
        compiler.compile(student=program, trainset=trainset)
        job = server.server.config.app.state.job
        status = job.status()
        assert status.status == "terminated" and status.steps == 2 and status.optimizer_steps >= 2
        assert served.policy == "policy-2" and status.last_swap_ms > 0
    finally:
        stop_server(served, server)


def test_dspy_grpo_groups_stay_per_invocation_when_the_first_parse_fails(tiny_chat_dir, tmp_path):
    """DSPy's default ChatAdapter retries a failed parse through JSONAdapter; the random model fails both. The
    groups DSPy's GRPO sends, as the trainer fed them, hold one prompt each: the ChatAdapter prompt of the call."""
    import json

    from dspy.teleprompt.grpo import GRPO

    served, server = start_server(tiny_chat_dir, tmp_path / "run")
    settings = server.server.config.app.state.settings
    settings.options = replace(settings.options, record_trained=True)
    try:
        lm = dspy.LM(f"openai/arbor:{MODEL_ID}", provider=ArborProvider(), api_base=f"{server.url}/v1/",
                     api_key=API_KEY, temperature=1.0, max_tokens=8, cache=False)
        program = dspy.Predict("question -> answer")
        program.set_lm(lm)
        trainset = [dspy.Example(question=f"What is {i} + {i}?", answer=str(2 * i)).with_inputs("question")
                    for i in range(2)]
        adapter = dspy.ChatAdapter()
        assert adapter.use_json_adapter_fallback  # DSPy's default
        compiler = GRPO(metric=lambda ex, pred, trace=None: float(getattr(pred, "answer", "") == ex.answer),
                        num_dspy_examples_per_grpo_step=1, num_rollouts_per_grpo_step=3, num_train_steps=2,
                        num_threads=3, exclude_demos=True, train_kwargs=TRAIN_KWARGS, num_steps_for_val=10)
        with dspy.context(adapter=adapter):
            compiler.compile(student=program, trainset=trainset)
        steps = sorted((tmp_path / "run" / "trained").glob("*.jsonl"))
        assert len(steps) == 2
        tokenizer = served.engine.tokenizer
        for path in steps:  # one example x one predictor per step: one group of 3
            fed = [json.loads(line) for line in path.read_text().splitlines()]
            assert len(fed) == 3 and len({tuple(f["prompt_ids"]) for f in fed}) == 1
            assert "[[ ## question ## ]]" in tokenizer.decode(fed[0]["prompt_ids"])
    finally:
        stop_server(served, server)
