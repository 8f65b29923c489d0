"""ArborProvider and its ReinforceJob against a real Espalier server (tiny model, stand-in trainer)."""

from __future__ import annotations

import sys
from pathlib import Path

import dspy
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "inference"))  # the serving fixtures and fake trainer

from serving_fixtures import API_KEY, MODEL_ID, served_app, served_server, tiny_chat_dir  # noqa: E402, F401

from espalier.program.provider import ArborProvider, ArborReinforceJob, GRPOJobError  # noqa: E402
from espalier.types import Group, Sample  # noqa: E402


@pytest.fixture(scope="module")
def lm(served_app) -> dspy.LM:  # noqa: F811
    _, url = served_app
    return dspy.LM(f"openai/arbor:{MODEL_ID}", provider=ArborProvider(), api_base=f"{url}/v1", api_key=API_KEY,
                   temperature=1.0, max_tokens=8, cache=False)


def test_provider_recognises_arbor_models():
    assert ArborProvider.is_provider_model("openai/arbor:HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not ArborProvider.is_provider_model("openai/gpt-4o")
    assert ArborProvider().reinforceable


def test_dspy_lm_chats_through_the_server(lm):
    out = lm("Say something.")
    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], str)


def test_reinforce_job_speaks_the_job_api(lm):
    job = lm.reinforce(train_kwargs={"num_generations": 2})
    assert isinstance(job, ArborReinforceJob) and job.job_id
    assert job.get_status()["pending_batch_ids"] == [0]
    member = {"messages": [{"role": "user", "content": "hi"}], "completion": {"role": "assistant", "content": "yo"}}
    status = job.step([{"batch_id": 0, "group": [{**member, "reward": 1.0}, {**member, "reward": 0.0}]}],
                      train_data_format="grpo_chat")
    assert status["steps"] == 1 and status["pending_batch_ids"] == [1]
    status = job.step_groups([Group((Sample((1, 2), (3,), 1.0), Sample((1, 2), (4,), 0.0)))])
    assert status.steps == 2 and status.status == "running" and status.pending_batch_ids == (2,)
    job.save_checkpoint("best", score=0.5)
    assert job.checkpoints["best"]["model"] == f"openai/arbor:{MODEL_ID}@{job.job_id}/best"
    assert job.checkpoints["best"]["checkpoint_name"] == "best" and job.checkpoints["best"]["score"] == 0.5
    best = dspy.LM(job.checkpoints["best"]["model"], provider=ArborProvider(), api_base=lm.kwargs["api_base"],
                   api_key=API_KEY, max_tokens=4, cache=False)
    assert isinstance(best("hi")[0], str)
    assert job.terminate()["status"] == "terminated"
    with pytest.raises(GRPOJobError, match="terminated") as err:
        job.step_groups([Group((Sample((1,), (2,), 1.0),))])
    assert err.value.status_code == 409


def test_bad_train_kwargs_raise_with_the_servers_message(lm):
    with pytest.raises(GRPOJobError, match="bogus"):
        lm.reinforce(train_kwargs={"bogus": True})
