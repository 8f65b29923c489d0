"""The OpenAI-compatible front on a real loopback server with a tiny model (transformers engine)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from serving_fixtures import API_KEY, MODEL_ID, random_adapter

from espalier.inference.chat import render_prompt

MESSAGES = [{"role": "user", "content": "Name a prime number."}]


def chat(url: str, key: str | None = API_KEY, **body) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    payload = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 8, **body}
    return httpx.post(f"{url}/v1/chat/completions", json=payload, headers=headers, timeout=120)


def test_openai_client_chat_and_token_ids_round_trip(served_app):
    served, url = served_app
    tok = served.engine.tokenizer
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY)
    kwargs = dict(model=MODEL_ID, messages=MESSAGES, max_tokens=12, temperature=1.0, seed=7, logprobs=True)
    first = client.chat.completions.create(**kwargs).model_dump()
    again = client.chat.completions.create(**kwargs).model_dump()
    choice = first["choices"][0]
    assert tok.decode(first["prompt_token_ids"]) == render_prompt(tok, MESSAGES)
    assert tok.decode(choice["token_ids"], skip_special_tokens=True) == choice["message"]["content"]
    assert len(choice["logprobs"]["content"]) == len(choice["token_ids"])
    assert all(t["logprob"] <= 0 for t in choice["logprobs"]["content"])
    assert again["choices"][0]["token_ids"] == choice["token_ids"]  # same seed, same sample


def test_continue_final_message_and_completions_with_token_ids(served_app):
    served, url = served_app
    tok = served.engine.tokenizer
    prefix = [*MESSAGES, {"role": "assistant", "content": "[[ ## answer ## ]]\n"}]
    r = chat(url, messages=prefix, continue_final_message=True, temperature=0)
    assert r.status_code == 200, r.text
    prompt = tok.decode(r.json()["prompt_token_ids"])
    assert prompt.endswith("[[ ## answer ## ]]\n") and not prompt.endswith("<|im_start|>assistant\n")
    ids = r.json()["prompt_token_ids"]
    r2 = httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
                    json={"model": f"arbor:{MODEL_ID}", "prompt": ids, "max_tokens": 8, "temperature": 0})
    assert r2.status_code == 200, r2.text
    assert r2.json()["choices"][0]["token_ids"] == r.json()["choices"][0]["token_ids"]  # same prompt ids, greedy


def test_adapter_changes_output_and_unloading_restores_it(served_app, tmp_path):
    served, url = served_app
    before = chat(url, temperature=0, max_tokens=10).json()["choices"][0]["token_ids"]
    served.engine.load_adapter("probe", random_adapter(served.engine.model_path, tmp_path / "a", seed=1))
    served.checkpoints["probe"] = "probe"  # serve it as <id>@probe
    try:
        with_adapter = chat(url, model=f"{MODEL_ID}@probe", temperature=0, max_tokens=10).json()
        base = chat(url, model=f"{MODEL_ID}@base", temperature=0, max_tokens=10).json()
        assert with_adapter["choices"][0]["token_ids"] != before
        assert base["choices"][0]["token_ids"] == before
    finally:
        del served.checkpoints["probe"]
        served.engine.unload_adapter("probe")
    assert chat(url, temperature=0, max_tokens=10).json()["choices"][0]["token_ids"] == before


def test_concurrent_requests_with_different_settings(served_app):
    from concurrent.futures import ThreadPoolExecutor

    _, url = served_app
    settings = [dict(temperature=t, top_p=p, top_k=k, n=n, seed=i) for i, (t, p, k, n) in
                enumerate([(0, 1, -1, 1), (1.0, 0.9, 5, 2), (0.7, 1, -1, 1), (1.3, 0.5, 0, 3)] * 2)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda s: chat(url, max_tokens=6, **s), settings))
    for s, r in zip(settings, answers, strict=True):
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == s["n"]
        assert all(1 <= len(c["token_ids"]) <= 6 for c in r.json()["choices"])


def test_api_key_is_required(served_app):
    _, url = served_app
    assert chat(url, key=None).status_code == 401
    wrong = chat(url, key="nope")
    assert wrong.status_code == 401 and "API key" in wrong.json()["error"]["message"]
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"model": "nope"}, 404, "unknown model"),
        ({"model": f"{MODEL_ID}@nockpt"}, 404, "unknown checkpoint"),
        ({"temperature": -0.5}, 400, "temperature"),
        ({"top_p": 0}, 400, "top_p"),
        ({"top_p": 1.5}, 400, "top_p"),
        ({"top_k": -2}, 400, "top_k"),
        ({"max_tokens": 100_000}, 400, "context"),
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"n": 0}, 400, "n must"),
        ({"temperature": "hot"}, 400, "number"),
        ({"stream": True}, 400, "stream"),
        ({"messages": []}, 400, "messages"),
        ({"stop": 3}, 400, "stop"),
    ],
)
def test_bad_requests_get_a_clear_4xx(served_app, body, status, words):
    _, url = served_app
    r = chat(url, **body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_malformed_json_and_oversize_body(served_app):
    _, url = served_app
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{url}/v1/chat/completions", content=b'{"model": ', headers=headers)
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    big = json.dumps({"model": MODEL_ID, "messages": [{"role": "user", "content": "x" * 300_000}]})
    r = httpx.post(f"{url}/v1/chat/completions", content=big, headers=headers)
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]["message"]


def test_failed_batch_fails_cleanly_and_a_stopped_engine_is_restarted(served_app, monkeypatch):
    served, url = served_app
    engine = served.engine
    original = engine._step

    def broken(batch):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(engine, "_step", broken)
    r = chat(url)
    assert r.status_code == 500 and "simulated device failure" in r.json()["error"]["message"]
    monkeypatch.setattr(engine, "_step", original)
    assert chat(url).status_code == 200  # the engine went on

    engine.close()  # the worker thread is gone: the next request restarts it
    assert not engine.alive()
    r = chat(url)
    assert r.status_code == 200, r.text
    assert engine.alive()


def test_a_request_whose_client_went_away_stops_generating(served_app):
    served, url = served_app
    before = served.engine.cancelled_requests
    body = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 900, "n": 8, "temperature": 1.0}
    with pytest.raises(httpx.TimeoutException):  # the client gives up and closes its connection
        httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                   timeout=1.0)
    import time

    deadline = time.monotonic() + 20
    while served.engine.cancelled_requests == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert served.engine.cancelled_requests == before + 1
    assert chat(url, temperature=0).status_code == 200  # and the engine serves the next one
