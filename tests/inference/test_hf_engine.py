"""The transformers engine's continuous batching and prefix cache, against one-request-at-a-time decoding."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from serving_fixtures import random_adapter

from espalier.inference.engine import EngineError, GenerateRequest
from espalier.inference.hf_engine import TransformersEngine
from espalier.inference.hf_model import require_full_attention
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
    cached = TransformersEngine(tiny_chat_dir, prefill_bf16=False, decode_bf16=False)
    plain = TransformersEngine(tiny_chat_dir, prefix_cache_mb=0, prefill_bf16=False, decode_bf16=False)
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


def assert_same(got, want, tol: float = 1e-4) -> None:
    for g, w in zip(got, want, strict=True):
        assert [s.token_ids for s in g] == [s.token_ids for s in w]
        for a, b in zip(g, w, strict=True):
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < tol


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


def test_prompts_waiting_together_are_prefilled_in_one_pass_and_decode_as_if_alone(engines, monkeypatch):
    """Requests that wait together (every run of a GRPO step starts at once) are prefilled in one forward pass
    after the first, each after its own cached prefix (or none), and decode as if each had been alone."""
    from espalier.inference import prefill

    passes, real = [], prefill.PaddedPrefill.of
    monkeypatch.setattr(prefill.PaddedPrefill, "of", staticmethod(lambda ps: passes.append(len(ps)) or real(ps)))
    requests = [greedy(p, max_tokens=4 + i, adapter="a") for i, p in enumerate(prompts(6, seed=5))]
    requests.append(replace(greedy(prompts(1, seed=6)[0], 5, "a", n=2), temperature=1.0, seed=11))
    cached, plain = engines
    alone = one_at_a_time(plain, requests)
    for engine in (cached, plain):  # with cached prefixes of different lengths, and without any
        passes.clear()
        with ThreadPoolExecutor(len(requests)) as pool:
            with engine._model_lock:  # the engine holds its first request while the others queue up behind it
                futures = [pool.submit(engine.generate, r, 120) for r in requests]
                time.sleep(0.5)
            assert_same([f.result() for f in futures], alone)
        assert passes and max(passes) >= 2


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


def test_a_request_whose_distribution_breaks_fails_alone(engines):
    """A temperature the server refuses (1e-45 overflows logits / T) sent straight to the engine: the
    requests batched with it still get their answers."""
    cached, plain = engines
    ordinary = [greedy(p, 6) for p in prompts(4, seed=6)]
    hostile = GenerateRequest(prompt_ids=(1000,), max_tokens=6, temperature=1e-45)

    def run(request):
        try:
            return cached.generate(request, timeout=120)
        except EngineError as e:
            return e

    with ThreadPoolExecutor(5) as pool:
        got = list(pool.map(run, [*ordinary[:2], hostile, *ordinary[2:]]))
    assert isinstance(got[2], EngineError) and "non-finite" in str(got[2])
    assert_same([*got[:2], *got[3:]], one_at_a_time(plain, ordinary))


def test_more_rows_than_the_batch_cap_are_served_in_parts_with_the_same_seeds(tiny_chat_dir):
    engine = TransformersEngine(tiny_chat_dir, max_batch_rows=4, prefill_bf16=False, decode_bf16=False)
    try:
        request = GenerateRequest(prompt_ids=tuple(prompts(1, seed=8)[0]), max_tokens=5, temperature=1.0, n=10, seed=7)
        rows = engine.generate(request, timeout=120)
        assert len(rows) == 10
        ninth = engine.generate(GenerateRequest(**{**request.__dict__, "n": 1, "seed": 7 + 9}), timeout=120)
        assert rows[9].token_ids == ninth[0].token_ids  # row j draws from seed + j, wherever it was split
    finally:
        engine.close()


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

    require_full_attention(LlamaConfig())
    with pytest.raises(EngineError, match="--engine vllm"):
        require_full_attention(MistralConfig(sliding_window=8))


# ---- merged adapters: the served policy is W0 + scale * B @ A, against peft's unmerged layers ----------------------


def peft_greedy(model_dir: Path, adapter: Path | None, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probs from a plain forward pass per token (peft's unmerged LoRA layers)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    ids, tokens, logprobs = list(prompt), [], []
    with torch.inference_mode():
        for _ in range(max_tokens):
            logp = model(input_ids=torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)  # (V,)
            token = int(logp.argmax())
            tokens.append(token)
            logprobs.append(float(logp[token]))
            ids.append(token)
    return tokens, logprobs


def assert_matches_peft(got, want, tol: float = 1e-4) -> None:
    tokens, logprobs = want
    assert list(got.token_ids) == tokens[: len(got.token_ids)]
    assert max(abs(a - b) for a, b in zip(got.logprobs, logprobs, strict=False)) < tol


def all_projections_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """The recipe's shape (every projection) with rsLoRA and an alpha pattern, so the scale rules are checked too."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, use_rslora=True, alpha_pattern={"down_proj": 2},
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"],
                        init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def merged(tiny_chat_dir: Path, tmp_path_factory):
    """An engine serving two adapters (policy, checkpoint) merged, and their directories."""
    root = tmp_path_factory.mktemp("merged")
    dirs = {"policy": all_projections_adapter(tiny_chat_dir, root / "p", seed=5),
            "ckpt": random_adapter(tiny_chat_dir, root / "c", seed=6)}
    engine = TransformersEngine(tiny_chat_dir, prefill_bf16=False, decode_bf16=False)
    for name, path in dirs.items():
        engine.load_adapter(name, path)
    yield engine, dirs
    engine.close()


def test_merged_policy_base_and_checkpoint_decode_as_peft_does(merged, tiny_chat_dir):
    engine, dirs = merged
    prompt = prompts(1, seed=21)[0]
    order = ["policy", None, "ckpt", "policy", None]  # every switch: merged -> base -> other merge -> back
    for adapter in order:
        want = peft_greedy(tiny_chat_dir, dirs.get(adapter), prompt, 8)
        assert_matches_peft(engine.generate(greedy(prompt, 8, adapter))[0], want)
    assert engine._weights.merges == 2  # both merges kept: switching back re-points weights, no re-merge


def test_concurrent_requests_of_merged_adapters_and_base_each_get_their_own_weights(merged, tiny_chat_dir):
    engine, dirs = merged
    ps = prompts(6, seed=22)
    adapters = ["policy", None, "ckpt", "policy", "ckpt", None]
    requests = [greedy(p, 6, a) for p, a in zip(ps, adapters, strict=True)]
    for request, got in zip(requests, concurrently(engine, requests), strict=True):
        assert_matches_peft(got[0], peft_greedy(tiny_chat_dir, dirs.get(request.adapter), list(request.prompt_ids), 6))


def test_a_reloaded_adapter_replaces_the_previous_merge(tiny_chat_dir, tmp_path):
    engine = TransformersEngine(tiny_chat_dir, prefix_cache_mb=0, prefill_bf16=False, decode_bf16=False)
    try:
        prompt = prompts(1, seed=23)[0]
        first, second = (random_adapter(tiny_chat_dir, tmp_path / f"a{i}", seed=30 + i) for i in range(2))
        engine.load_adapter("policy", first)
        assert_matches_peft(engine.generate(greedy(prompt, 6, "policy"))[0], peft_greedy(tiny_chat_dir, first, prompt, 6))
        engine.load_adapter("policy", second)  # W0 + delta(second), not W0 + delta(first) + delta(second)
        assert_matches_peft(engine.generate(greedy(prompt, 6, "policy"))[0], peft_greedy(tiny_chat_dir, second, prompt, 6))
        engine.unload_adapter("policy")
        assert_matches_peft(engine.generate(greedy(prompt, 6))[0], peft_greedy(tiny_chat_dir, None, prompt, 6))
    finally:
        engine.close()


def test_bf16_engine_decodes_batched_as_alone_and_close_to_fp32(tiny_chat_dir, tmp_path):
    adapter = all_projections_adapter(tiny_chat_dir, tmp_path / "p", seed=7)
    fast = TransformersEngine(tiny_chat_dir, prefill_bf16=True, decode_bf16=True)
    exact = TransformersEngine(tiny_chat_dir, prefill_bf16=False, decode_bf16=False)
    try:
        for e in (fast, exact):
            e.load_adapter("policy", adapter)
        requests = [greedy(p, 1, "policy") for p in prompts(4, seed=24)]
        bf16, fp32 = concurrently(fast, requests), one_at_a_time(exact, requests)
        for a, b in zip(bf16, fp32, strict=True):  # the first token comes from the bf16 prefill
            assert abs(a[0].logprobs[0] - b[0].logprobs[0]) < 0.05
        assert_same(bf16, one_at_a_time(fast, requests))
        longer = [greedy(list(r.prompt_ids), 6, "policy") for r in requests]
        # bf16 matmuls round differently with the batch's row count: same tokens, log-probs within bf16 rounding
        batched = concurrently(fast, longer)
        assert_same(batched, one_at_a_time(fast, longer), tol=5e-3)
        for request, (got,) in zip(longer, batched, strict=True):  # every decoded token near the exact fp32 model's
            exact_lp = exact_logprobs(exact, request.prompt_ids, got.token_ids)
            assert max(abs(a - b) for a, b in zip(got.logprobs, exact_lp, strict=True)) < 0.05
    finally:
        fast.close()
        exact.close()


def exact_logprobs(engine: TransformersEngine, prompt: tuple[int, ...], tokens: tuple[int, ...]) -> list[float]:
    """Log-probs of `tokens` after `prompt` from one fp32 forward pass of the engine's model as it stands."""
    with torch.inference_mode():
        logits = engine.model(torch.tensor([[*prompt, *tokens]])).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens).unsqueeze(1)).squeeze(1).tolist()


def test_adapters_the_engine_cannot_merge_are_refused_with_the_fix(tiny_chat_dir, tmp_path):
    import json

    from espalier.inference.lora import read_adapter

    path = random_adapter(tiny_chat_dir, tmp_path / "dora", seed=1)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="--engine vllm"):
        read_adapter(path)


def test_a_growing_cache_keeps_its_dtype_when_a_step_arrives_in_bf16():
    """Under bf16 autocast a decode step's values come out in bf16: the fp32 cache stays fp32 as it grows."""
    from espalier.inference.kv import GrowingLayer

    layer = GrowingLayer()
    layer.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    for _ in range(100):  # past the spare columns: the buffers are reallocated
        keys, values = layer.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4, dtype=torch.bfloat16))
    assert keys.dtype == values.dtype == torch.float32 and keys.shape[-2] == 103


def test_an_all_bf16_engine_holds_no_fp32_merge_of_an_adapter(tiny_chat_dir, tmp_path):
    """Where prefill and decode both run on bf16 copies, an adapter's fp32 merge is dropped once its bf16 copy is
    made (nothing computes with it); an engine that decodes in fp32 keeps it, and both stay within `keep` sets."""
    adapters = [all_projections_adapter(tiny_chat_dir, tmp_path / f"p{i}", seed=7 + i) for i in range(3)]
    fast = TransformersEngine(tiny_chat_dir, prefill_bf16=True, decode_bf16=True)
    mixed = TransformersEngine(tiny_chat_dir, prefill_bf16=True, decode_bf16=False)
    try:
        for engine in (fast, mixed):
            for i, path in enumerate(adapters):
                engine.load_adapter(f"a{i}", path)
                engine.generate(greedy(prompts(1, seed=26)[0], 3, f"a{i}"))
        assert fast._weights._merged == {} and list(fast._weights._low) == ["a1", "a2"]
        served = {m.weight.dtype for name, m in fast._weights.modules.items() if name not in fast._weights.full_precision}
        assert served == {torch.bfloat16}
        assert list(mixed._weights._merged) == ["a1", "a2"]
        assert all(w.dtype == torch.float32 for w in mixed._weights._merged["a2"].values())
    finally:
        fast.close()
        mixed.close()
