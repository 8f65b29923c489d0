"""A plain transformers engine with continuous batching and a prefix cache: for CPUs and machines without vLLM.

A background thread runs one decode step at a time for every row in flight. Between steps,
finished rows leave (their futures resolve) and waiting requests join: each new prompt
reuses the KV of the longest prefix it shares with a recent prompt or finished sequence of
the same adapter (`kv.PrefixCache`); of the prompts waiting together the first is prefilled
alone (the others may share its prefix), the rest in one pass (`prefill.py`); rows are then
left-padded into the batch (`kv.DecodeBatch`). Every row keeps its own sampling parameters
and seed (`sampling.py`).

Departures from Arbor / `transformers.generate`:
1. Rows of one forward pass carry different temperatures, top-p, top-k, penalties, seeds
   and stop strings; the token ids returned are exactly those sampled, EOS included.
2. LoRA adapters are merged into the served weights (`lora.WeightSets`: W0 + scale * B @ A,
   W0 kept), so the policy decodes at the base model's speed; a batch holds rows of one
   adapter, its weight set is put in place by re-pointing each Linear (no copy), and
   requests wait in arrival order for the batch of theirs.
3. A failed step fails only the rows in flight, with the reason; a dead worker thread is
   brought back by `restart()` with the same model and adapters.
4. Full-attention models only (sliding-window layers would need their own KV layout):
   others are refused with a pointer to `--engine vllm`.
5. Prefill and decode run in bf16 where bf16 matmuls are faster (`precision.fast_bf16`), the LM
   head and KV cache in fp32 (a bf16 cache took the sampler's gap to an fp32 trainer from 0.008
   to 0.13 nats a token); the head on a weight packed once (`hf_model.PackedHead`); the first
   token's log-prob is the prefill's. Attention: `attention.py`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from espalier.inference import hf_model
from espalier.inference.attention import use_gqa_sdpa
from espalier.inference.engine import EngineError, EngineUnavailable, GeneratedSequence, GenerateRequest, split_rows
from espalier.inference.kv import DecodeBatch, GrowingCache, PrefixCache, cache_kv
from espalier.inference.lora import LoraFactors, WeightSets, read_adapter
from espalier.inference.prefill import PaddedPrefill, Prompt, passes
from espalier.inference.sampling import RowParams, sample_rows_with_top
from espalier.precision import fast_bf16

log = logging.getLogger(__name__)
_UNKNOWN = object()  # the weights in place after an adapter was (re)loaded or unloaded


@dataclass
class _Row:
    request: GenerateRequest
    params: RowParams
    pending: _Pending
    seen: torch.Tensor  # (P + T,) prompt and sampled ids, for the repetition penalty
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[tuple[tuple[int, float], ...]] = field(default_factory=list)  # per token, when top_logprobs > 0
    finish: str | None = None


@dataclass
class _Pending:
    request: GenerateRequest
    future: Future
    rows: list[_Row] = field(default_factory=list)


class TransformersEngine:
    def __init__(self, model_path: Path, device: str = "cpu", max_batch_rows: int = 32, prefix_cache_mb: int = 1024,
                 prefill_bf16: bool | None = None, decode_bf16: bool | None = None, threads: int | None = None):
        self.model_path = Path(model_path)
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32).to(device).eval()
        hf_model.require_full_attention(self.model.config)
        use_gqa_sdpa(self.model)
        self.max_model_len = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.eos_ids = hf_model.eos_ids(self.model, self.tokenizer)
        self.max_batch_rows = max_batch_rows
        self.prefix_cache = PrefixCache(prefix_cache_mb * 2**20)
        self.cancelled_requests = 0  # requests dropped mid-generation because their client went away
        self._adapters: dict[str, Path] = {}
        self._factors: dict[str, dict[str, LoraFactors]] = {}
        prefill_bf16 = fast_bf16(device) if prefill_bf16 is None else prefill_bf16
        decode_bf16 = prefill_bf16 if decode_bf16 is None else decode_bf16
        self._head = hf_model.PackedHead(self.model.get_output_embeddings()) if hf_model.plain_head(self.model) else None
        self.prefill_bf16, self.decode_bf16 = (flag and self._head is not None for flag in (prefill_bf16, decode_bf16))
        self._weights = WeightSets(self.model, full_precision=hf_model.head_names(self.model),
                                   low_only=self.prefill_bf16 and self.decode_bf16)  # fp32 merges never computed with
        self.threads = threads
        if self.prefill_bf16 or self.decode_bf16:  # the first bf16 forward sets up its kernels (~10 s on a busy CPU)
            with torch.inference_mode(), hf_model.torch_threads(threads):
                self._forward(torch.tensor([[0]], device=device), None, None, low=True)
        self._active: str | None | object = _UNKNOWN  # the adapter whose weights are in place (None: the base)
        self._model_lock = threading.Lock()  # held while a step runs or an adapter is (un)loaded
        self._queue: queue.Queue[_Pending] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.restart()

    # ---- Engine protocol -------------------------------------------------------------

    def generate(self, request: GenerateRequest, timeout: float | None = None) -> list[GeneratedSequence]:
        if not self.alive():
            raise EngineUnavailable("the transformers engine is not running")
        if request.adapter is not None and request.adapter not in self._adapters:
            raise EngineError(f"adapter {request.adapter!r} is not loaded")
        parts = [_Pending(part, Future()) for part in split_rows(request, self.max_batch_rows)]
        for pending in parts:
            self._queue.put(pending)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            return [s for p in parts for s in p.future.result(None if deadline is None else deadline - time.monotonic())]
        except FutureTimeout as e:
            for pending in parts:
                pending.future.cancel()
            raise EngineError(f"generation did not finish within {timeout} s") from e

    def load_adapter(self, name: str, path: Path, policy: bool = False) -> None:  # merges whichever a batch uses
        factors = read_adapter(Path(path))
        with self._model_lock:
            self._weights.forget(name)  # a reload replaces the previous merge
            self._adapters[name], self._factors[name] = Path(path), factors
            self.prefix_cache.drop(name)
            self._active = _UNKNOWN

    def unload_adapter(self, name: str) -> None:
        with self._model_lock:
            if name not in self._adapters:
                raise KeyError(f"adapter {name!r} is not loaded")
            del self._adapters[name], self._factors[name]
            self._weights.forget(name)
            self.prefix_cache.drop(name)
            self._active = _UNKNOWN

    def adapters(self) -> dict[str, Path]:
        return dict(self._adapters)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def restart(self) -> None:
        self.close()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(self._stop,), name="espalier-hf-engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        _fail(self._drain_queue(), EngineUnavailable("the transformers engine was stopped"))

    # ---- worker ----------------------------------------------------------------------

    def _drain_queue(self) -> list[_Pending]:
        found = []
        while True:
            try:
                found.append(self._queue.get_nowait())
            except queue.Empty:
                return found

    def _loop(self, stop: threading.Event) -> None:
        batch, waiting = DecodeBatch(self.max_batch_rows), deque()
        try:
            while not stop.is_set():
                if not batch and not waiting:
                    with contextlib.suppress(queue.Empty):
                        waiting.append(self._queue.get(timeout=0.1))
                waiting.extend(self._drain_queue())
                self._admit(batch, waiting)
                if batch:
                    self._step_or_fail(batch)
        finally:
            _fail([*_in_flight(batch), *waiting], EngineUnavailable("the transformers engine was stopped"))

    def _admit(self, batch: DecodeBatch, waiting: deque[_Pending]) -> None:
        """Move waiting requests of the batch's adapter into it, in arrival order, while rows are free."""
        group: list[_Pending] = []
        while waiting:
            p, adapter = waiting[0], batch.adapter if batch else group[0].request.adapter if group else None
            rows = len(batch) + sum(q.request.n for q in group)
            if (batch or group) and (p.request.adapter != adapter or rows + p.request.n > self.max_batch_rows):
                break
            waiting.popleft()
            if p.request.cancel is not None and p.request.cancel.is_set() and not p.future.done():
                self.cancelled_requests += 1
                p.future.set_exception(EngineError("generation was cancelled before it started"))
            elif p.future.set_running_or_notify_cancel():
                group.append(p)
        if group:
            batch.adapter = group[0].request.adapter
            self._prefill_group(batch, group)

    def _prefill_group(self, batch: DecodeBatch, group: list[_Pending]) -> None:
        """The first prompt alone (it may hold the prefix the others share), then the rest in one pass where there
        are two or more (`prefill.py`), else, or if that pass fails, one by one; a request that fails fails alone."""
        self._guarded(group[0], lambda: self._prefill(batch, group[0]))
        rest = group[1:]
        if len(rest) > 1 and self._head is not None:
            try:
                self._locked(rest[0].request.adapter, lambda: self._prefill_together(batch, rest))
            except Exception as e:  # the pass failed before any row joined: one by one (below)
                log.warning("prefilling %d prompts in one pass failed (%s: %s); one by one", len(rest), type(e).__name__, e)
        for p in rest:
            if not p.rows and not p.future.done():
                self._guarded(p, lambda p=p: self._prefill(batch, p))

    def _locked(self, adapter: str | None, work) -> None:
        with self._model_lock, torch.inference_mode(), hf_model.torch_threads(self.threads):
            self._use_adapter(adapter)
            work()

    def _guarded(self, p: _Pending, work) -> None:
        """`work` for `p` with its adapter in place; an error fails `p` alone."""
        try:
            self._locked(p.request.adapter, work)
        except Exception as e:  # this request fails, the others go on
            _failed(p, e)

    def _prefill(self, batch: DecodeBatch, p: _Pending) -> None:
        """Feed the prompt (after its cached prefix), sample each row's first token, add live rows to the batch."""
        prompt = torch.tensor(p.request.prompt_ids, device=self.device)
        reused, prefix = self.prefix_cache.lookup(p.request.adapter, prompt)
        cache = GrowingCache(prefix) if prefix else None
        logits, cache = self._forward(prompt[reused:].unsqueeze(0), cache, p.request.adapter, self.prefill_bf16)
        self._start_rows(batch, p, prompt, logits, cache_kv(cache))

    def _prefill_together(self, batch: DecodeBatch, group: list[_Pending]) -> None:
        """Prompts in passes of at most `prefill.PASS_TOKENS` padded new tokens, each after its own cached prefix."""
        prompts = []
        for p in group:
            ids = torch.tensor(p.request.prompt_ids, device=self.device)
            prompts.append(Prompt(ids, *self.prefix_cache.lookup(p.request.adapter, ids)))
        for part in passes(prompts):
            padded = PaddedPrefill.of([prompts[i] for i in part])
            logits, cache = self._forward(padded.ids, padded.cache, group[0].request.adapter, self.prefill_bf16,
                                          last=padded.last, attention_mask=padded.mask, position_ids=padded.positions)
            kvs = [padded.row_kv(cache, row, prompts[i]) for row, i in enumerate(part)]
            for row, i in enumerate(part):  # from here each request on its own
                try:
                    self._start_rows(batch, group[i], prompts[i].ids, logits[row : row + 1], kvs[row])
                except Exception as e:
                    _failed(group[i], e)

    def _start_rows(self, batch: DecodeBatch, p: _Pending, prompt: torch.Tensor, logits: torch.Tensor, kv) -> None:
        """Cache the prompt's KV, sample each row's first token from `logits` (1, V), add live rows to the batch."""
        kv = [(k.float(), v.float()) for k, v in kv]  # decode steps keep an fp32 cache
        self.prefix_cache.add(p.request.adapter, prompt, kv)
        p.rows = [self._row(p, j, prompt) for j in range(p.request.n)]
        tokens = self._sample(p.rows, logits.expand(len(p.rows), -1))  # (n,)
        live = [i for i, r in enumerate(p.rows) if r.finish is None]
        if live:
            batch.join([p.rows[i] for i in live], kv, tokens[live].unsqueeze(1))
        self._resolve_if_done(p)

    def _forward(self, ids: torch.Tensor, cache, adapter: str | None, low: bool, last: torch.Tensor | None = None,
                 **kwargs):
        """Logits (B, V) in fp32 at each row's `last` position (default: the last) and the cache the model filled.

        `low`: the decoder runs under bf16 autocast on bf16 weight copies (chosen where `precision.fast_bf16`
        measures bf16 faster: BENCHMARKS.md, "precision"); the LM head always runs in fp32 (`PackedHead`)."""
        if self._head is None:  # soft-capped or scaled logits: the model computes them
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1, **kwargs)
            return out.logits[:, -1, :].float(), out.past_key_values
        swap = low and not self._weights.low_only  # low_only: the bf16 copies are in place already
        if swap:
            self._weights.use(adapter, self._factors.get(adapter), low=True)
        try:
            with torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=low):
                out = self.model.get_decoder()(input_ids=ids, past_key_values=cache, use_cache=True, **kwargs)
        finally:
            if swap:
                self._weights.use(adapter, self._factors.get(adapter))
        hidden = out.last_hidden_state
        hidden = hidden[:, -1] if last is None else hidden[torch.arange(len(hidden), device=hidden.device), last]
        return self._head(hidden.float()), out.past_key_values

    def _step_or_fail(self, batch: DecodeBatch) -> None:
        try:
            with self._model_lock, torch.inference_mode(), hf_model.torch_threads(self.threads):
                self._use_adapter(batch.adapter)
                self._step(batch)
        except Exception as e:  # the rows in flight fail, the engine goes on
            _fail(_in_flight(batch), EngineError(f"generation failed: {type(e).__name__}: {e}"))
            batch.keep([])

    def _step(self, batch: DecodeBatch) -> None:
        """One decode step for every row in flight; finished rows leave the batch."""
        mask = torch.cat([batch.mask, torch.ones_like(batch.next_ids)], dim=1)  # (B, W + 1)
        positions = mask.sum(-1, keepdim=True) - 1  # (B, 1)
        logits, _ = self._forward(batch.next_ids, batch.cache, batch.adapter, self.decode_bf16, attention_mask=mask,
                                  position_ids=positions)  # (B, V)
        batch.mask = mask
        batch.next_ids = self._sample(batch.rows, logits).unsqueeze(1)
        for row in batch.rows:
            if row.finish is None and row.request.cancel is not None and row.request.cancel.is_set():
                row.finish = "cancelled"
        done = [i for i, r in enumerate(batch.rows) if r.finish is not None]
        for i in done:
            row = batch.rows[i]
            self.prefix_cache.add(batch.adapter, row.seen[:-1], batch.row_kv(i))
            self._resolve_if_done(row.pending)
        if done:
            batch.keep([i for i, r in enumerate(batch.rows) if r.finish is None])

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        k = max(r.request.top_logprobs for r in rows)
        tokens, logprobs, tops = sample_rows_with_top(logits, [r.seen for r in rows], [r.params for r in rows], k)
        for i, r in enumerate(rows):
            if r.request.top_logprobs:
                r.top.append(tops[i][: r.request.top_logprobs])
            self._append(r, int(tokens[i]), float(logprobs[i]))
            r.seen = torch.cat([r.seen, tokens[i : i + 1]])
        return tokens

    def _resolve_if_done(self, p: _Pending) -> None:
        if not all(r.finish is not None for r in p.rows) or p.future.done():
            return
        if any(r.finish == "cancelled" for r in p.rows):
            self.cancelled_requests += 1
            p.future.set_exception(EngineError("generation was cancelled: nobody waits for it any more"))
        elif any(r.finish == "error" for r in p.rows):
            p.future.set_exception(EngineError(
                f"generation failed: the sampling distribution became non-finite (temperature "
                f"{p.request.temperature}, repetition_penalty {p.request.repetition_penalty})"))
        else:
            p.future.set_result([self._finish(r) for r in p.rows])

    def _row(self, p: _Pending, index: int, prompt: torch.Tensor) -> _Row:
        request, generator = p.request, None
        if request.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(request.seed + index)
        params = RowParams(request.temperature, request.top_p, request.top_k, request.repetition_penalty, generator)
        return _Row(request, params, p, prompt)

    def _use_adapter(self, adapter: str | None) -> None:
        """Put the weights of `adapter` (None: the base model) in place, merging them if they are not held."""
        if adapter != self._active:
            self._weights.use(adapter, self._factors.get(adapter))
            self._active = adapter

    def _append(self, row: _Row, token: int, logprob: float) -> None:
        if not math.isfinite(logprob):  # this request's distribution broke: it fails alone (sampling.py)
            for r in row.pending.rows:
                r.finish = "error"
            return
        row.tokens.append(token)
        row.logprobs.append(logprob)
        if token in self.eos_ids:
            row.finish = "stop"
        elif row.request.stop and _find_stop(self._text(row.tokens), row.request.stop) is not None:
            row.finish = "stop"
        elif len(row.tokens) >= row.request.max_tokens:
            row.finish = "length"

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _finish(self, row: _Row) -> GeneratedSequence:
        text = self._text(row.tokens)
        cut = _find_stop(text, row.request.stop)
        return GeneratedSequence(
            token_ids=tuple(row.tokens),
            text=text if cut is None else text[:cut],
            finish_reason=row.finish or "length",
            logprobs=tuple(row.logprobs) if row.request.logprobs else None,
            top_logprobs=tuple(row.top) if row.request.top_logprobs else None,
        )


def _in_flight(batch: DecodeBatch) -> list[_Pending]:
    """The requests with rows in the batch, each once."""
    return list({id(r.pending): r.pending for r in batch.rows}.values())


def _failed(p: _Pending, error: Exception) -> None:
    _fail([p], EngineError(f"generation failed: {type(error).__name__}: {error}"))


def _fail(pendings: list[_Pending], error: Exception) -> None:
    for p in pendings:
        if not p.future.done():
            with contextlib.suppress(InvalidStateError):
                p.future.set_exception(error)


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for s in stops if s and (i := text.find(s)) >= 0]
    return min(hits) if hits else None
