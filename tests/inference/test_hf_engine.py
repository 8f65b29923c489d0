"""The transformers engine's continuous batching and prefix cache, against one-request-at-a-time decoding."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from serving_fixtures import random_adapter

from espalier.inference.engine import EngineError, GenerateRequest
from espalier.inference.hf_engine import TransformersEngine, _require_full_attention
from espalier.inference.kv import PrefixCache


def greedy(prompt: list[int], max_tokens: int, adapter: str | None = None, n: int = 1) -> GenerateRequest:
    return GenerateRequest(prompt_ids=tuple(prompt), max_tokens=max_tokens, temperature=0.0, adapter=adapter, n=n)


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(10, 4000, (17,), generator=g).tolist()  # a shared "system prompt"
    return [
        shared + torch.randint(10, 4000, (int(n),), generator=g).tolist()
        for n in torch.randint(1, 40, (count,), generator=g)
    ]


@pytest.fixture(scope="module")
def engines(tiny_chat_dir: Path, tmp_path_factory):
    """(cached, uncached) engines on the same tiny model, each with the same adapter loaded."""
    adapter = random_adapter(tiny_chat_dir, tmp_path_factory.mktemp("adapter"), seed=3)
    cached, plain = TransformersEngine(tiny_chat_dir), TransformersEngine(tiny_chat_dir, prefix_cache_mb=0)
    for e in (cached, plain):
        e.load_adapter("a", adapter)
    yield cached, plain
    cached.close()
    plain.close()


def one_at_a_time(engine: TransformersEngine, requests: list[GenerateRequest]):
    return [engine.generate(r, timeout=120) for r in requests]


def concurrently(engine: TransformersEngine, requests: list[GenerateRequest]):
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda r: engine.generate(r, timeout=120), requests))


def assert_same(got, want) -> None:
    for g, w in zip(got, want, strict=True):
        assert [s.token_ids for s in g] == [s.token_ids for s in w]
        for a, b in zip(g, w, strict=True):
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4


def test_rows_joining_and_leaving_a_running_batch_decode_as_if_alone(engines):
    cached, plain = engines
    requests = [
        greedy(p, max_tokens=3 + 5 * (i % 4), adapter=("a" if i % 3 else None)) for i, p in enumerate(prompts(12))
    ]
    alone = one_at_a_time(plain, requests)
    assert_same(concurrently(cached, requests), alone)  # mixed lengths, adapters, prefix reuse
    assert_same(concurrently(plain, requests), alone)
    assert all(
        len(s.token_ids) == r.max_tokens or s.finish_reason == "stop" for r, o in zip(requests, alone, strict=True) for s in o
    )


def test_prefix_cache_reuses_a_continued_prompt_and_changes_nothing(engines):
    cached, plain = engines
    prompt = prompts(1, seed=5)[0]
    first = cached.generate(greedy(prompt, 8, "a"))[0]
    continued = prompt + list(first.token_ids) + [42, 43]  # a fieldwise adapter's next call
    before = cached.prefix_cache.reused_tokens
    got = cached.generate(greedy(continued, 8, "a"))
    assert cached.prefix_cache.reused_tokens - before >= len(prompt) + len(first.token_ids) - 1
    assert_same([got], [plain.generate(greedy(continued, 8, "a"))])


def test_reloading_an_adapter_forgets_its_cached_prefixes(engines, tiny_chat_dir, tmp_path):
    cached, plain = engines
    prompt = prompts(1, seed=9)[0]
    other = random_adapter(tiny_chat_dir, tmp_path / "b", seed=11)
    for e in (cached, plain):
        e.load_adapter("b", random_adapter(tiny_chat_dir, tmp_path / "b0", seed=10))
    cached.generate(greedy(prompt, 4, "b"))
    for e in (cached, plain):
        e.load_adapter("b", other)  # same name, new weights: cached KV of the old ones must not be used
    assert_same([cached.generate(greedy(prompt + [7], 6, "b"))], [plain.generate(greedy(prompt + [7], 6, "b"))])


def test_n_samples_share_one_prefill_and_keep_their_own_seeds(engines):
    cached, _ = engines
    prompt = prompts(1, seed=2)[0]
    request = GenerateRequest(prompt_ids=tuple(prompt), max_tokens=6, temperature=1.0, n=3, seed=4)
    out = cached.generate(request)
    assert len(out) == 3 and [s.token_ids for s in out] == [s.token_ids for s in cached.generate(request)]
    assert len({s.token_ids for s in out}) > 1


def test_prefix_cache_lookup_eviction_and_adapters():
    cache = PrefixCache(max_bytes=2 * 4 * 10 * 4)  # room for two 10-token entries of 1 layer, (1, 1, L, 2) K and V
    kv = lambda n: [(torch.arange(2 * n, dtype=torch.float32).view(1, 1, n, 2),) * 2]  # noqa: E731
    cache.add("x", torch.arange(10), kv(10))
    assert cache.lookup("y", torch.arange(12)) == (0, None)  # other adapter
    n, got = cache.lookup("x", torch.tensor([0, 1, 2, 9, 9]))
    assert n == 3 and got[0][0].shape[-2] == 3
    assert cache.lookup("x", torch.arange(10))[0] == 9  # one token is always left to feed
    cache.add("x", torch.arange(10, 20), kv(10))
    cache.add("x", torch.arange(20, 30), kv(10))  # over budget: the least recently used goes
    assert cache.lookup("x", torch.arange(5))[0] == 0
    assert cache.lookup("x", torch.arange(20, 25))[0] == 4
    cache.drop("x")
    assert cache.lookup("x", torch.arange(20, 25))[0] == 0


def test_sliding_window_models_are_refused_with_the_fix():
    from transformers import LlamaConfig, MistralConfig

    _require_full_attention(LlamaConfig())
    with pytest.raises(EngineError, match="--engine vllm"):
        _require_full_attention(MistralConfig(sliding_window=8))
