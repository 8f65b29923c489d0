"""Malformed and hostile requests to both route families of a real server (real trainer, tiny model).

Each gets a 4xx naming the problem, never a 5xx or a hang, and the server stays healthy: a
greedy answer after the flood equals the one before it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

import httpx
import pytest
from serving_fixtures import API_KEY, MODEL_ID, start_server, stop_server

HEADERS = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
GRPO = "/v1/fine_tuning/grpo"
HUGE = "1" + "0" * 400  # a JSON integer no float holds
CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMPLETION = {"model": MODEL_ID, "prompt": [1000], "max_tokens": 4}


@pytest.fixture(scope="module")
def server(tiny_chat_dir, tmp_path_factory) -> Iterator[str]:
    served, thread = start_server(tiny_chat_dir, tmp_path_factory.mktemp("fuzz"))
    yield thread.url
    stop_server(served, thread)


def send(url: str, route: str, body: str | dict) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(f"{url}{route}", content=content.encode("utf-8", "surrogatepass"), headers=HEADERS, timeout=120)


def greedy(url: str) -> list[int]:
    r = send(url, "/v1/chat/completions", {**CHAT, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


# Raw bodies: the JSON literals Python writes for non-finite floats, and values json.dumps cannot write.
SAMPLING = [
    ("temperature", "1e-37"), ("temperature", "1e-40"), ("temperature", "NaN"), ("temperature", "Infinity"),
    ("temperature", "1e308"), ("repetition_penalty", "1e-45"), ("repetition_penalty", "1e300"),
    ("repetition_penalty", "NaN"), ("top_k", "1e30"), ("top_k", "100000000000"), ("top_p", "NaN"),
    ("seed", str(2**70)), ("seed", str(-(2**70))), ("max_tokens", "1e999"),
    ("max_tokens", "-Infinity"), ("n", "NaN"), ("n", "1e300"), ("logprobs", "NaN"),
    ("stop", "[1, 2]"), ("stop", '["x", null]'), ("model", "7"), ("max_tokens", '"4"'),
    ("n", HUGE), ("temperature", HUGE), ("seed", HUGE), ("max_tokens", "-" + HUGE),
]


# Extreme values that are still valid: each is served.
EXTREME = [
    ("top_p", "1e-320"), ("top_k", str(2**31 - 1)), ("temperature", "100"), ("temperature", "1e-4"),
    ("repetition_penalty", "0.01"), ("repetition_penalty", "100"), ("seed", str(2**63 - 1)),
    ("seed", str(-(2**63))), ("n", "128"),
]


def _with(base: dict, field: str, literal: str) -> str:
    return json.dumps({k: v for k, v in base.items() if k != field})[:-1] + f', "{field}": {literal}}}'


@pytest.mark.parametrize(("route", "base"), [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)])
def test_hostile_sampling_values_get_a_4xx_and_extreme_valid_ones_are_served(server, route, base):
    for field, literal in SAMPLING:
        r = send(server, route, _with(base, field, literal))
        assert 400 <= r.status_code < 500, (field, literal, r.status_code, r.text)
        assert r.json()["error"]["message"]
    for field, literal in EXTREME:
        r = send(server, route, _with({**base, "temperature": 1.0}, field, literal))
        assert r.status_code == 200, (field, literal, r.status_code, r.text)
        assert len(r.json()["choices"]) == (128 if field == "n" else 1)


MALFORMED = [
    "[" * 100_000 + "]" * 100_000,
    '{"a":' * 50_000 + "1" + "}" * 50_000,
    json.dumps({**CHAT, "messages": [{"role": "user", "content": "\ud800"}]}, ensure_ascii=False),
    json.dumps({**CHAT, "messages": [{"role": "user", "content": "\\ud800 lone"}]}).replace("\\\\ud800", "\\ud800"),
    json.dumps({**CHAT, "messages": "hi"}),
    json.dumps({**CHAT, "messages": []}),
    json.dumps({**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}),
    json.dumps({**CHAT, "messages": [{"role": "user", "content": 7}]}),
    json.dumps({**CHAT, "logprobs": True, "top_logprobs": 1e300}),
    json.dumps({**CHAT, "logprobs": "yes"}),
    json.dumps({**CHAT, "messages": [["user", "hi"]]}),
    json.dumps({**CHAT, "logprobs": True, "top_logprobs": 1000}),
    json.dumps({**CHAT, "n": 129}),
    json.dumps({**CHAT, "model": f"{MODEL_ID}@nope"}),
    json.dumps({**CHAT, "model": None}),
    "null", "7", '"text"', "{", "\x00",
]


def test_malformed_bodies_get_a_4xx(server):
    for body in MALFORMED:
        r = send(server, "/v1/chat/completions", body)
        assert 400 <= r.status_code < 500, (body[:80], r.status_code, r.text[:300])


def _random_value(rng: random.Random, depth: int = 0):
    kinds = [None, True, -1, 0, 2**64, 1e-300, -1e300, "", "x" * 50, "\u0000", [], {}]
    if depth < 2:
        kinds += [[_random_value(rng, depth + 1)], {"k": _random_value(rng, depth + 1)}]
    return rng.choice(kinds)


def test_random_field_values_never_give_a_5xx(server):
    rng = random.Random(0)
    fields = ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed",
              "logprobs", "top_logprobs", "repetition_penalty", "continue_final_message", "stream"]
    for i in range(150):
        route, base = rng.choice([("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)])
        body = dict(base)
        for field in rng.sample(fields, 2):
            body[field] = _random_value(rng)
        r = send(server, route, body)
        assert r.status_code < 500, (i, body, r.status_code, r.text[:300])


def grpo(url: str, route: str, body: str | dict) -> httpx.Response:
    return send(url, f"{GRPO}/{route}", body)


def sample(reward: float = 1.0, prompt=(1, 2, 3), completion=(4, 5), **extra) -> dict:
    return {"prompt_ids": list(prompt), "completion_ids": list(completion), "reward": reward, **extra}


BAD_INITIALIZE = [
    {"model": MODEL_ID, "gpu_config": "abc"},
    {"model": MODEL_ID, "gpu_config": {"multi": 3}},
    {"model": MODEL_ID, "trainer_config": [1]},
    {"model": MODEL_ID, "learning_rate": "abc"},
    {"model": MODEL_ID, "trainer_config": {"learning_rate": "abc"}},
    {"model": MODEL_ID, "trainer_config": {"bf16": "yes"}},
    {"model": MODEL_ID, "trainer_config": {"lora_config": {"r": 1e9}}},
    {"model": MODEL_ID, "trainer_config": {"lora_config": {"r": 0}}},
    {"model": MODEL_ID, "trainer_config": {"lora_config": {"lora_dropout": 2}}},
    {"model": MODEL_ID, "batches_per_step": 2_000_000},
    {"model": MODEL_ID, "batches_per_step": "x"},
    {"model": 7},
    json.dumps({"model": MODEL_ID, "trainer_config": {"learning_rate": 0}}).replace("0}", HUGE + "}"),
    json.dumps({"model": MODEL_ID, "trainer_config": {"num_training_gpus": 0}}).replace("0}", HUGE + "}"),
    {"model": MODEL_ID, "resume_job": "not-a-job"},
    {"model": MODEL_ID, "resume_job": "grpo-0123456789ab", "resume_step": -1},
]

BAD_STEPS = [
    {"groups": [{"samples": [sample("nan"), sample(0.0)]}]},
    '{"groups": [{"samples": [{"prompt_ids": [1], "completion_ids": [2], "reward": NaN}]}]}',
    {"groups": [{"samples": [sample(prompt=(10**9,)), sample(0.0)]}]},
    {"groups": [{"samples": [sample(prompt=(-1,)), sample(0.0)]}]},
    {"groups": [{"samples": [sample(prompt=(2**70,)), sample(0.0)]}]},
    {"groups": [{"samples": [sample(prompt=(1.5,)), sample(0.0)]}]},
    {"groups": [{"samples": [sample(completion="ab"), sample(0.0)]}]},
    {"groups": [{"samples": [sample(completion=[True]), sample(0.0)]}]},
    {"groups": [{"samples": [sample(prompt=()), sample(0.0)]}]},
    {"groups": [{"samples": [sample(prompt=(1,) * 100_000), sample(0.0)]}]},
    {"groups": [{"samples": [sample(logprobs=[-0.1]), sample(0.0)]}]},
    {"groups": [{"samples": [sample(reward=[1]), sample(0.0)]}]},
    {"groups": [{"samples": []}]},
    {"groups": [{}]},
    {"groups": ["x"]},
    {"groups": "x"},
    {"groups": []},
    {"batch": []},
    {"batch": [[{"messages": [{"role": "user", "content": "hi"}], "completion": "yes"}]]},
    {"batch": [{"batch_id": "x", "group": [sample(), sample(0.0)]}]},
    {"batch": 5},
    '{"groups": [{"samples": [{"prompt_ids": [1], "completion_ids": [2], "reward": HUGE}]}]}'.replace("HUGE", HUGE),
    '{"groups": [{"samples": [{"prompt_ids": [1], "completion_ids": [2], "reward": 1, "logprobs": [-HUGE]}]}]}'.replace(
        "HUGE", HUGE),
    '{"batch": [{"batch_id": Infinity, "group": [{"prompt_ids": [1], "completion_ids": [2], "reward": 1}]}]}',
    {"job_id": [], "groups": [{"samples": [sample(), sample(0.0)]}]},
]

BAD_CHECKPOINT_NAMES = ["", "a\x00b", "x" * 300, ".hidden", "base", "a/b", "a@b", 7, None]


def test_grpo_routes_refuse_bad_input_and_lose_nothing(server):
    assert grpo(server, "step", {"groups": [{"samples": [sample()]}]}).status_code == 404  # no job yet
    for body in BAD_INITIALIZE:
        r = grpo(server, "initialize", body)
        assert 400 <= r.status_code < 500, (body, r.status_code, r.text[:300])
    job = grpo(server, "initialize", {"model": MODEL_ID})
    assert job.status_code == 200, job.text
    r = grpo(server, "initialize", {"model": MODEL_ID, "resume_job": job.json()["job_id"], "resume_step": 99})
    assert r.status_code == 409 and "no state saved" in r.text  # refused before the running job is touched
    assert grpo(server, "status", {}).json()["job_id"] == job.json()["job_id"]
    before = greedy(server)
    for body in BAD_STEPS:
        r = grpo(server, "step", body)
        assert 400 <= r.status_code < 500, (str(body)[:120], r.status_code, r.text[:300])
    for name in BAD_CHECKPOINT_NAMES:
        r = grpo(server, "checkpoint", {"checkpoint_name": name})
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:300])
    status = grpo(server, "status", {}).json()
    assert status["status"] == "running" and status["steps"] == 0 and status["error"] is None
    assert greedy(server) == before  # nothing was published

    r = grpo(server, "step", {"groups": [{"samples": [sample(1.0), sample(0.0, completion=(6, 7))]}]})
    assert r.status_code == 200, r.text
    r = grpo(server, "checkpoint", {"checkpoint_name": "v1.0"})
    assert r.status_code == 200, r.text
    chat = send(server, "/v1/chat/completions", {**CHAT, "model": f"{MODEL_ID}@{r.json()['job_id']}/v1.0"})
    assert chat.status_code == 200, chat.text
    assert grpo(server, "status", {}).json()["steps"] == 1


def test_simultaneous_initialize_calls_leave_one_trainer(server):
    import multiprocessing
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: grpo(server, "initialize", {"model": MODEL_ID}), range(2)))
    assert [a.status_code for a in answers] == [200, 200]
    trainers = [p for p in multiprocessing.active_children() if p.name == "espalier-trainer" and p.is_alive()]
    assert len(trainers) == 1
    assert grpo(server, "status", {}).json()["job_id"] in {a.json()["job_id"] for a in answers}


def _raw(url: str, head: str, chunks: list[bytes], wait: float = 0.0) -> bytes:
    """Send a request by hand (a chunked or a truncated body) and return the raw answer."""
    import socket
    import time

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(head.encode())
        for chunk in chunks:
            s.sendall(chunk)
        time.sleep(wait)
        return s.recv(65536)


def test_a_chunked_body_over_the_limit_is_413_and_a_stalled_body_408(server, monkeypatch):
    import espalier.inference.http_io as http_io

    auth = f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\n\r\n"
    piece = b"x" * 65536
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] * 8 + [b"0\r\n\r\n"]  # 512 KiB, no Content-Length
    assert _raw(server, head, chunks).startswith(b"HTTP/1.1 413")
    monkeypatch.setattr(http_io, "BODY_READ_TIMEOUT", 1.0)
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 100\r\n\r\n"
    assert _raw(server, head, [b'{"model": '], wait=2.0).startswith(b"HTTP/1.1 408")
    assert greedy(server)  # and the server still answers
