"""`espalier.inference.launch.init` starts the server as a subprocess, and `shutdown` stops it."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
from serving_fixtures import random_adapter

from espalier.inference import launch

pytestmark = pytest.mark.slow


def test_init_serves_until_shutdown(tiny_chat_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "restored after the test")
    monkeypatch.delenv("OPENAI_API_KEY")  # unset, as for a user who never set it
    adapter = random_adapter(tiny_chat_dir, tmp_path / "adapter", seed=3)
    info = launch.init(model=str(tiny_chat_dir), engine="transformers", api_key="k", timeout=300,
                       run_dir=tmp_path, adapter=adapter)
    try:
        assert set(info) >= {"base_url", "port", "api_key", "model"}
        assert info["base_url"] == f"http://127.0.0.1:{info['port']}/v1/" and info["api_key"] == "k"
        import os

        assert os.environ["OPENAI_API_KEY"] == "k"  # what dspy.LM(...) without api_key sends
        client = openai.OpenAI(base_url=info["base_url"], api_key="k")
        reply = client.chat.completions.create(model=info["model"], messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4)
        assert reply.choices[0].message.content is not None
        greedy = {m: client.chat.completions.create(model=m, messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=8, temperature=0).model_dump()["choices"][0]["token_ids"]
                  for m in (info["model"], info["model"] + "@base")}
        assert greedy[info["model"]] != greedy[info["model"] + "@base"]  # --adapter is the current policy
        assert httpx.get(info["base_url"] + "/models").status_code == 401
    finally:
        launch.shutdown()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{info['port']}/health", timeout=2)


def test_init_reports_a_server_that_cannot_start(tmp_path):
    with pytest.raises(RuntimeError, match="exited"):
        launch.init(model=str(tmp_path / "missing"), engine="transformers", timeout=120, run_dir=tmp_path)


def test_sigterm_to_the_parent_stops_its_server(tiny_chat_dir, tmp_path):
    """`kill <pid>` of a script that called espalier.init() must not leave the server running."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import sys, time, espalier\n"
        f"info = espalier.init(model={str(tiny_chat_dir)!r}, engine='transformers', run_dir={str(tmp_path)!r})\n"
        "print(info['pid'], flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    server_pid = int(parent.stdout.readline())
    parent.send_signal(signal.SIGTERM)
    parent.wait(timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(server_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(server_pid, signal.SIGKILL)
    raise AssertionError("the server outlived its parent")


def test_a_killed_server_takes_its_trainer_worker_with_it(tiny_chat_dir, tmp_path):
    """kill -9 of the server while a GRPO job is running: its trainer worker exits within seconds."""
    import os
    import signal

    import psutil

    info = launch.init(model=str(tiny_chat_dir), engine="transformers", api_key="k", timeout=300, run_dir=tmp_path)
    try:
        r = httpx.post(info["base_url"] + "fine_tuning/grpo/initialize", json={"model": info["model"]},
                       headers={"Authorization": "Bearer k"}, timeout=300)
        assert r.status_code == 200, r.text
        workers = psutil.Process(info["pid"]).children()
        assert workers
        os.kill(info["pid"], signal.SIGKILL)
        gone, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, f"{len(alive)} trainer process(es) outlived the server"
    finally:
        launch.shutdown()


def test_sigterm_lets_a_request_in_flight_finish(tiny_chat_dir, tmp_path):
    """SIGTERM to the server while it generates: the request in flight gets its whole answer, then the server exits
    (uvicorn's graceful shutdown, 10 s at most)."""
    import os
    import signal
    import threading
    import time

    import psutil

    info = launch.init(model=str(tiny_chat_dir), engine="transformers", api_key="k", timeout=300, run_dir=tmp_path)
    try:
        replies: list[httpx.Response] = []
        body = {"model": info["model"], "prompt": "Once upon a time", "max_tokens": 400, "temperature": 1.0,
                "n": 4, "seed": 1}
        request = threading.Thread(target=lambda: replies.append(httpx.post(
            info["base_url"] + "completions", json=body, headers={"Authorization": "Bearer k"}, timeout=120)))
        request.start()
        time.sleep(1.0)  # the request has reached the engine
        assert request.is_alive(), "the request finished before SIGTERM: make it longer"
        os.kill(info["pid"], signal.SIGTERM)
        request.join(timeout=60)
        assert replies and replies[0].status_code == 200, replies and replies[0].text
        choices = replies[0].json()["choices"]
        assert len(choices) == 4 and all(c["text"] for c in choices)
        psutil.Process(info["pid"]).wait(timeout=30)  # exits; psutil.TimeoutExpired otherwise
    finally:
        launch.shutdown()


def test_init_takes_the_server_flags_by_name_and_refuses_others():
    from dataclasses import fields

    from espalier.inference.server_options import ServerOptions, server_options, server_parser

    flags = {a.dest for a in server_parser()._actions} - {"help"}
    assert flags == {f.name for f in fields(ServerOptions)}  # every flag is a field, every field a flag
    options = server_options(model="m", run_dir="/tmp/r", train_processes=None)  # None keeps the default
    assert options.run_dir == Path("/tmp/r") and options.train_processes == 0
    with pytest.raises(TypeError, match="unknown server settings \\['gpus'\\]"):
        server_options(gpus=2)
