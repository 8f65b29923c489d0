"""kill -9 of a GRPO job's trainer worker (the real trainer): the job goes on from the last step's state
and ends where an uninterrupted job ends."""

from __future__ import annotations

import multiprocessing
import os
import signal

import httpx
import pytest
from serving_fixtures import API_KEY, MODEL_ID, start_server, stop_server

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
GRPO = "/v1/fine_tuning/grpo"
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def server(tiny_chat_dir, tmp_path_factory):
    served, thread = start_server(tiny_chat_dir, tmp_path_factory.mktemp("recovery"))
    yield thread.url
    stop_server(served, thread)


def post(url: str, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{GRPO}/{route}", json=body, headers=HEADERS, timeout=300)


def group(seed: int) -> dict:
    samples = [{"prompt_ids": [1, 2, 3 + seed], "completion_ids": [10 + i, 20 + seed, 30 + i], "reward": float(i % 2)}
               for i in range(4)]
    return {"key": f"g{seed}", "samples": samples}


def policy(url: str) -> tuple[list[int], list[float]]:
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0,
            "logprobs": True}
    choice = httpx.post(f"{url}/v1/chat/completions", json=body, headers=HEADERS, timeout=60).json()["choices"][0]
    return choice["token_ids"], [t["logprob"] for t in choice["logprobs"]["content"]]


def trainer_pid() -> int:
    [worker] = [p for p in multiprocessing.active_children() if p.name == "espalier-trainer" and p.is_alive()]
    return worker.pid


def run_job(url: str, kill_after: int | None) -> tuple[dict, tuple]:
    config = {"learning_rate": 0.05, "lora_config": LORA, "per_device_train_batch_size": 2}
    post(url, "initialize", {"model": MODEL_ID, "trainer_config": config}).raise_for_status()
    for step in range(3):
        if step == kill_after:
            os.kill(trainer_pid(), signal.SIGKILL)
        r = post(url, "step", {"groups": [group(step)]})
        if step == kill_after and r.status_code == 503:  # the kill landed while the step was sent: retry, as
            assert "retry" in r.json()["error"]["message"]  # ArborGRPO does
            r = post(url, "step", {"groups": [group(step)]})
        assert r.status_code == 200, r.text
    return r.json(), policy(url)


def test_a_killed_trainer_resumes_from_the_last_step_and_ends_as_if_never_killed(server):
    plain_status, plain = run_job(server, kill_after=None)
    status, resumed = run_job(server, kill_after=2)
    assert status["trainer_restarts"] == 1 and status["steps"] == 3 and status["status"] == "running"
    assert status["optimizer_steps"] == plain_status["optimizer_steps"] == 6
    assert resumed[0] == plain[0]
    assert max(abs(a - b) for a, b in zip(resumed[1], plain[1], strict=True)) < 1e-5
    post(server, "terminate", {})
