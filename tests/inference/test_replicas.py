"""Two transformers-engine replicas (each its own process) behind one server, with a tiny model: requests are spread
over both, a published adapter is served by both, and a replica killed with -9 mid-step loses no request and comes
back with the current policy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from serving_fixtures import API_KEY, MODEL_ID, random_adapter, start_server, stop_server

from espalier.inference.chat import prompt_ids
from espalier.inference.engine import EngineError, GenerateRequest
from espalier.inference.factory import make_engine, replica_gpus
from espalier.inference.hf_engine import TransformersEngine
from espalier.inference.replicas import ReplicaSet
from espalier.inference.server_options import parse_server_options, server_argv, server_options

pytestmark = pytest.mark.slow  # starts engine processes (about 15 s on 2 cores)
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def replicated(tiny_chat_dir, tmp_path_factory):
    """(served model, url) of a server in front of `--inference-replicas 2` (transformers engine, CPU)."""
    engine = make_engine(tiny_chat_dir, "transformers", 0, 300, replicas=2)
    assert isinstance(engine, ReplicaSet)
    served, thread = start_server(tiny_chat_dir, tmp_path_factory.mktemp("replicas"), engine=engine)
    yield served, thread.url
    stop_server(served, thread)


@pytest.fixture(scope="module")
def single(tiny_chat_dir):
    """One in-process engine: what every replica must answer like."""
    engine = TransformersEngine(tiny_chat_dir)  # the same prefill precision as the replicas (measured once here)
    yield engine
    engine.close()


def chat(url: str, **body) -> httpx.Response:
    payload = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 8, **body}
    return httpx.post(f"{url}/v1/chat/completions", json=payload, headers=HEADERS, timeout=120)


def health(url: str) -> list[dict]:
    return httpx.get(f"{url}/health", timeout=10).json()["replicas"]


def greedy(engine, adapter: str | None) -> tuple[int, ...]:
    prompt = tuple(prompt_ids(engine.tokenizer, MESSAGES, False))
    request = GenerateRequest(prompt, max_tokens=12, temperature=0, adapter=adapter)
    return engine.generate(request, timeout=60)[0].token_ids


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout} s")
        time.sleep(0.01)


def test_the_flag_is_written_once_and_gpus_split_evenly():
    assert parse_server_options([]).inference_replicas == 1
    options = server_options(model="m", inference_replicas=3, run_dir="/tmp/x")
    assert parse_server_options(server_argv(options)) == options  # init's keywords -> flags -> the same options
    assert replica_gpus(4, 2) == [(0, 1), (2, 3)] and replica_gpus(0, 3) == [(), (), ()]
    with pytest.raises(ValueError, match="multiple"):
        replica_gpus(3, 2)
    with pytest.raises(ValueError, match=">= 1"):
        replica_gpus(0, 0)


def test_concurrent_requests_land_on_both_replicas(replicated):
    _, url = replicated
    before = [r["served"] for r in health(url)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: chat(url, max_tokens=16, temperature=1.0, seed=i), range(8)))
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    replicas = health(url)
    served = [r["served"] - b for r, b in zip(replicas, before, strict=True)]
    assert sum(served) == 8 and min(served) > 0, served
    assert all(r["alive"] and r["in_flight"] == 0 and r["pid"] for r in replicas)
    assert len({r["pid"] for r in replicas}) == 2 and os.getpid() not in {r["pid"] for r in replicas}


def test_a_published_adapter_is_served_by_every_replica(replicated, single, tmp_path):
    served, url = replicated
    adapter = random_adapter(served.engine.model_path, tmp_path / "a", seed=1)
    served.publish(adapter)
    single.load_adapter("expected", adapter)
    expected, base = greedy(single, "expected"), greedy(single, None)
    assert expected != base
    for engine in served.engine.engines:  # the same greedy request, sent to each replica
        assert greedy(engine, served.policy) == expected
        assert greedy(engine, None) == base
    assert tuple(chat(url, temperature=0, max_tokens=12).json()["choices"][0]["token_ids"]) == expected


def test_a_cancelled_request_stops_on_its_replica_and_is_not_retried(replicated):
    served, url = replicated
    before = health(url)
    prompt = tuple(prompt_ids(served.engine.tokenizer, MESSAGES, False))
    cancel = threading.Event()
    request = GenerateRequest(prompt, max_tokens=1000, n=8, temperature=1.0, cancel=cancel)
    threading.Timer(0.3, cancel.set).start()
    with pytest.raises(EngineError, match="cancelled"):  # the event crossed the pipe and the host dropped the rows
        served.engine.generate(request, timeout=60)
    after = health(url)
    assert [(r["served"], r["lost"], r["pid"]) for r in after] == [(r["served"], r["lost"], r["pid"]) for r in before]


def test_an_adapter_that_fails_to_load_is_on_no_replica(replicated, tmp_path):
    served, _ = replicated
    with pytest.raises(ValueError):
        served.engine.load_adapter("broken", tmp_path / "missing")
    assert "broken" not in served.engine.adapters()
    assert all("broken" not in engine.adapters() for engine in served.engine.engines)


def test_a_replica_killed_mid_step_loses_no_request_and_returns_with_the_current_policy(replicated, single, tmp_path):
    served, url = replicated
    victim = health(url)[0]
    # a step's rollouts: long samples, so that the kill lands while replica 0 generates some of them
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(chat, url, max_tokens=400, temperature=1.0, seed=i) for i in range(8)]
        wait_until(lambda: health(url)[0]["in_flight"] > 0, 60, "replica 0 got no request")
        os.kill(victim["pid"], signal.SIGKILL)
        answers = [f.result() for f in futures]
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
    assert all(len(r.json()["choices"][0]["token_ids"]) > 0 for r in answers)
    assert health(url)[0]["lost"] >= 1  # it died with requests in flight; they were retried on replica 1

    newer = random_adapter(served.engine.model_path, tmp_path / "b", seed=2)
    served.publish(newer)  # a new policy while replica 0 may still be restarting
    wait_until(lambda: health(url)[0]["alive"], 120, "replica 0 did not come back")
    back = health(url)[0]
    assert back["restarts"] == victim["restarts"] + 1 and back["pid"] != victim["pid"]
    single.load_adapter("newer", newer)
    expected = greedy(single, "newer")
    assert [greedy(engine, served.policy) for engine in served.engine.engines] == [expected, expected]
    assert served.engine.engines[0].adapters() == served.engine.adapters()  # the old policy is gone there too


def test_an_engine_process_dies_with_its_parent(tiny_chat_dir):
    script = ("import sys, time\nfrom espalier.inference.engine_process import ProcessEngine\n"
              "if __name__ == '__main__':\n"
              f"    engine = ProcessEngine({str(tiny_chat_dir)!r}, threads=1, prefill_bf16=False)\n"
              "    print(engine.pid, flush=True)\n    time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        child = int(parent.stdout.readline())
        parent.kill()  # kill -9: no atexit, no multiprocessing cleanup
        parent.wait(timeout=10)
        wait_until(lambda: not _running(child), 30, f"engine process {child} outlived its parent")
    finally:
        parent.kill()


def _running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (an orphan's zombie waits for a reaper that may never come)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")
