"""The GRPO job routes with a stand-in trainer (fake_grpo_trainer.py) in a real worker process."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import httpx
import pytest
from fake_grpo_trainer import FakeFactory
from serving_fixtures import API_KEY, MODEL_ID

from espalier.config import TrainConfig
from espalier.inference.arbor_wire import groups_from_batch
from espalier.inference.job import GRPOJob, JobError, JobOptions
from espalier.types import Group, Sample

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
GRPO = "/v1/fine_tuning/grpo"


def post(url: str, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{GRPO}/{route}", json=body, headers=HEADERS, timeout=300)


def greedy(url: str, model: str = MODEL_ID) -> list[int]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=HEADERS, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


@contextlib.contextmanager
def trainer(served_server, factory: FakeFactory):
    """The server's jobs build their trainer with `factory` for the duration."""
    settings = served_server[1].server.config.app.state.settings
    settings.trainer_factory = factory
    try:
        yield served_server[1].url
    finally:
        settings.trainer_factory = FakeFactory()


def arbor_item(batch_id: int) -> dict:
    member = {"messages": [{"role": "user", "content": "Say yes."}], "completion": {"role": "assistant",
              "content": "yes"}, "reward": 1.0}
    return {"batch_id": batch_id, "group": [member, {**member, "reward": 0.0}]}


def test_arbor_items_become_groups_with_the_servers_template(served_app):
    served, _ = served_app
    tok = served.engine.tokenizer
    groups, ids = groups_from_batch([arbor_item(3)], tok)
    assert ids == [3] and len(groups) == 1 and len(groups[0].samples) == 2
    sample = groups[0].samples[0]
    assert tok.decode(sample.prompt_ids).endswith("<|im_start|>assistant\n")
    assert tok.decode(sample.completion_ids) == "yes<|im_end|>"
    exact = {"prompt_ids": [1, 2, 3], "completion_ids": [4, 5], "logprobs": [-0.1, -0.2], "reward": 0.5}
    groups, _ = groups_from_batch([{"batch_id": 0, "group": [exact]}], tok)
    assert groups[0].samples[0] == Sample((1, 2, 3), (4, 5), 0.5, (-0.1, -0.2))
    with pytest.raises(ValueError, match="reward"):
        groups_from_batch([[{"prompt_ids": [1], "completion_ids": [2]}]], tok)


def test_job_lifecycle_publishes_adapters_and_checkpoints(served_app):
    served, url = served_app
    base = greedy(url)
    assert post(url, "initialize", {"model": f"arbor:{MODEL_ID}", "trainer_config": {"bogus": 1}}).status_code == 400
    status = post(url, "initialize", {"model": MODEL_ID, "trainer_config": {"num_generations": 2}}).json()
    job_id = status["job_id"]
    assert status["status"] == "running" and status["pending_batch_ids"] == [0]

    status = post(url, "step", {"job_id": job_id, "model": MODEL_ID, "batch": [arbor_item(0)]}).json()
    assert status["steps"] == 1 and status["pending_batch_ids"] == [1]
    assert status["last_swap_ms"] is not None and status["last_swap_ms"] > 0
    after_one = greedy(url)
    assert after_one != base and greedy(url, f"{MODEL_ID}@base") == base

    status = post(url, "checkpoint", {"job_id": job_id, "checkpoint_name": "c1", "metadata": {"score": 0.5}}).json()
    record = status["checkpoints"]["c1"]  # Arbor's checkpoint record, plus the model name that serves it
    assert status["last_checkpoint"] == "c1" and record["model"] == f"{MODEL_ID}@{job_id}/c1"
    assert record["checkpoint_name"] == "c1" and record["metadata"] == {"score": 0.5} and record["global_step"] == 1
    assert record["checkpoint_dir"].endswith(f"checkpoints/{job_id}/c1")
    assert status["checkpoint_models"]["c1"] == record["model"]
    group = Group((Sample((1, 2), (3,), 1.0), Sample((1, 2), (4, 5), 0.0)), key="g")
    status = post(url, "step", {"job_id": job_id, "groups": [group.to_dict()]}).json()
    assert status["steps"] == 2 and status["metrics"][0]["num_sequences"] == 2
    assert greedy(url, f"{MODEL_ID}@{job_id}/c1") == after_one and greedy(url) != after_one

    assert post(url, "status", {"job_id": "other"}).status_code == 404
    assert post(url, "step", {"job_id": job_id, "batch": []}).status_code == 400
    three = Group((*group.samples, Sample((1, 2), (6,), 0.5)), key="g3")  # num_generations is 2, as Arbor checks
    wrong = post(url, "step", {"job_id": job_id, "groups": [three.to_dict()]})
    assert wrong.status_code == 400 and "num_generations is 2" in wrong.text
    assert post(url, "status", {"job_id": job_id}).json()["steps"] == 2  # nothing was trained or counted
    status = post(url, "terminate", {"job_id": job_id}).json()
    assert status["status"] == "terminated" and status["pending_batch_ids"] == []
    assert post(url, "step", {"job_id": job_id, "batch": [arbor_item(2)]}).status_code == 409
    assert greedy(url) != base  # the trained policy stays served


def test_a_trainer_that_dies_mid_step_is_restarted_and_the_step_retried(served_server, tmp_path):
    with trainer(served_server, FakeFactory(die_once_marker=str(tmp_path / "died"))) as url:
        job_id = post(url, "initialize", {"model": MODEL_ID}).json()["job_id"]
        r = post(url, "step", {"job_id": job_id, "batch": [arbor_item(0)]})
    assert r.status_code == 503 and "restarted from step 0: retry" in r.json()["error"]["message"]
    status = post(url, "status", {"job_id": job_id}).json()
    assert status["status"] == "running" and status["trainer_restarts"] == 1 and status["steps"] == 0
    status = post(url, "step", {"job_id": job_id, "batch": [arbor_item(0)]}).json()
    assert status["steps"] == 1 and status["optimizer_steps"] == 1 and status["trainer_restarts"] == 1
    post(url, "cancel", {})


def test_a_trainer_that_keeps_dying_fails_the_job_after_its_restarts(served_server):
    from espalier.inference.job import MAX_RESTARTS

    with trainer(served_server, FakeFactory(die_at_step=1)) as url:
        job_id = post(url, "initialize", {"model": MODEL_ID}).json()["job_id"]
    for _ in range(MAX_RESTARTS):
        assert post(url, "step", {"job_id": job_id, "batch": [arbor_item(0)]}).status_code == 503
    r = post(url, "step", {"job_id": job_id, "batch": [arbor_item(0)]})
    assert r.status_code == 500 and "trainer process died" in r.json()["error"]["message"]
    status = post(url, "status", {"job_id": job_id}).json()
    assert status["status"] == "failed" and "exit code 3" in status["error"]
    r = post(url, "step", {"job_id": job_id, "batch": [arbor_item(0)]})
    assert r.status_code == 409 and "failed" in r.json()["error"]["message"]
    assert post(url, "initialize", {"model": MODEL_ID}).status_code == 200  # a new job may start
    post(url, "cancel", {})


def test_a_new_initialize_ends_a_job_whose_client_is_gone(served_app):
    """A client that crashed mid-compile never terminates its job: the next initialize must not get a 409."""
    _, url = served_app
    first = post(url, "initialize", {"model": MODEL_ID, "trainer_config": {"num_generations": 2}}).json()["job_id"]
    post(url, "step", {"job_id": first, "batch": [arbor_item(0)]})
    post(url, "checkpoint", {"job_id": first, "checkpoint_name": "step-1"})
    trained = greedy(url, f"{MODEL_ID}@{first}/step-1")
    # ... the client dies here, and a new one initializes.
    second = post(url, "initialize", {"model": MODEL_ID, "trainer_config": {"num_generations": 2}}).json()
    assert second["status"] == "running" and second["job_id"] != first
    r = post(url, "step", {"job_id": first, "batch": [arbor_item(1)]})  # the old client, if it was only slow
    assert r.status_code == 409 and second["job_id"] in r.json()["error"]["message"]
    post(url, "step", {"job_id": second["job_id"], "batch": [arbor_item(0)]})
    status = post(url, "checkpoint", {"job_id": second["job_id"], "checkpoint_name": "step-1"}).json()
    assert status["checkpoints"]["step-1"]["model"] == f"{MODEL_ID}@{second['job_id']}/step-1"
    assert greedy(url, f"{MODEL_ID}@{first}/step-1") == trained  # the first job's step-1 is still its own
    assert post(url, "terminate", {"job_id": second["job_id"]}).json()["status"] == "terminated"


class StubServed:
    """What a job needs of the served model when nothing is sampled: publishing an adapter."""

    model_id = MODEL_ID

    def publish(self, adapter: Path) -> float:
        return 1.0


def test_cancel_waits_for_the_step_in_flight_then_stops_the_trainer_cleanly(tiny_chat_dir, tmp_path):
    """A stop, not a kill: on several nodes that is what lets every rank, another node's too, exit 0."""
    options = JobOptions(tiny_chat_dir, tmp_path, TrainConfig(), factory=FakeFactory(step_seconds=3.0))
    job = GRPOJob(StubServed(), options)
    refused: list[int] = []

    def step() -> None:
        try:
            job.step([Group((Sample((1, 2), (3,), 1.0), Sample((1, 2), (4,), 0.0)), key="g")], [])
        except JobError as e:
            refused.append(e.status)

    thread = threading.Thread(target=step)
    thread.start()
    time.sleep(1.0)  # the step is in flight
    job.cancel()
    thread.join(10)
    assert job._trainer.exitcode == 0 and job.state.status == "cancelled"
    assert refused == [409] and job.state.steps == 0  # the step trained, but a cancelled job publishes nothing


class PublishingServed(StubServed):
    """Records what the job publishes and serves as checkpoints."""

    def __init__(self) -> None:
        self.published: list[Path] = []
        self.checkpoints: dict[str, Path] = {}

    def publish(self, adapter: Path) -> float:
        self.published.append(adapter)
        return 1.0

    def add_checkpoint(self, name: str, adapter: Path) -> str:
        self.checkpoints[name] = adapter
        return f"{MODEL_ID}@{name}"


def test_an_in_process_trainer_trains_checkpoints_and_stops_like_a_worker(tiny_chat_dir, tmp_path):
    from safetensors.torch import load_file

    config = TrainConfig(learning_rate=1e-2, gradient_accumulation_steps=1, per_device_train_batch_size=2)
    served = PublishingServed()
    job = GRPOJob(served, JobOptions(tiny_chat_dir, tmp_path, config, in_process=True))
    job.step((Group((Sample((1, 2), (3, 4), 1.0), Sample((1, 2), (5,), 0.0)), key="g"),))
    assert job.state.steps == 1 and job.state.optimizer_steps == 1
    lora_b = [t for n, t in load_file(served.published[0] / "adapter_model.safetensors").items() if "lora_B" in n]
    assert lora_b and any(t.abs().max() > 0 for t in lora_b)  # B starts at zero: the step trained the adapter
    record = job.checkpoint("c1")
    assert (Path(record["checkpoint_dir"]).is_dir() and record["global_step"] == 1
            and served.checkpoints[f"{job.state.job_id}/c1"] == Path(record["adapter_dir"]))
    job.terminate()
    assert job.state.status == "terminated" and not job._trainer.alive
    with pytest.raises(JobError, match="one rank") as refused:
        GRPOJob(served, JobOptions(tiny_chat_dir, tmp_path / "two", config, processes=2, in_process=True))
    assert refused.value.status == 400
