"""A plain transformers engine with continuous batching and a prefix cache: for CPUs and machines without vLLM.

A background thread runs one decode step at a time for every row in flight. Between steps,
finished rows leave (their futures resolve) and waiting requests join: each new prompt is
prefilled on its own, reusing the KV of the longest prefix it shares with a recent prompt
or finished sequence of the same adapter (`kv.PrefixCache`), then left-padded into the
batch (`kv.DecodeBatch`). Every row keeps its own sampling parameters and seed
(`sampling.py`).

Departures from Arbor / `transformers.generate`:
1. Rows of one forward pass carry different temperatures, top-p, top-k, penalties, seeds
   and stop strings; the token ids returned are exactly those sampled, EOS included.
2. LoRA adapters are peft adapters held in memory next to the base weights and switched
   per batch (`set_adapter` / `disable_adapter`); the base weights never move. A batch holds
   rows of one adapter; requests wait in arrival order for the batch of theirs.
3. A failed step fails only the rows in flight, with the reason; a dead worker thread is
   brought back by `restart()` with the same model and adapters.
4. Full-attention models only (sliding-window layers would need their own KV layout):
   others are refused with a pointer to `--engine vllm`.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import warnings
from collections import deque
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from espalier.inference.engine import EngineError, EngineUnavailable, GeneratedSequence, GenerateRequest
from espalier.inference.kv import DecodeBatch, GrowingCache, PrefixCache, cache_kv
from espalier.inference.sampling import RowParams, sample_rows_with_top

_UNKNOWN = object()  # peft's active adapter after a load or unload


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
    def __init__(self, model_path: Path, device: str = "cpu", max_batch_rows: int = 32, prefix_cache_mb: int = 1024):
        self.model_path = Path(model_path)
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32).to(device).eval()
        _require_full_attention(self.model.config)
        self.max_model_len = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.max_batch_rows = max_batch_rows
        self.prefix_cache = PrefixCache(prefix_cache_mb * 2**20)
        self._adapters: dict[str, Path] = {}
        self._active: str | None | object = _UNKNOWN  # the adapter peft has active (None: adapter layers off)
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
        pending = _Pending(request, Future())
        self._queue.put(pending)
        try:
            return pending.future.result(timeout=timeout)
        except FutureTimeout as e:
            pending.future.cancel()
            raise EngineError(f"generation did not finish within {timeout} s") from e

    def load_adapter(self, name: str, path: Path) -> None:
        from peft import PeftModel

        with self._model_lock:
            if name in self._adapters:
                self._delete_adapter(name)
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(path), adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name).eval()
            self._adapters[name] = Path(path)
            self.prefix_cache.drop(name)
            self._active = _UNKNOWN

    def unload_adapter(self, name: str) -> None:
        with self._model_lock:
            if name not in self._adapters:
                raise KeyError(f"adapter {name!r} is not loaded")
            self._delete_adapter(name)
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

    def _delete_adapter(self, name: str) -> None:
        del self._adapters[name]
        if self._adapters:
            with warnings.catch_warnings():  # peft warns when the active adapter goes; we set one per batch
                warnings.simplefilter("ignore", UserWarning)
                self.model.delete_adapter(name)
        else:  # peft cannot delete its last adapter: drop the LoRA layers (no merge)
            self.model = self.model.unload().eval()

    def _drain_queue(self) -> list[_Pending]:
        found = []
        while True:
            try:
                found.append(self._queue.get_nowait())
            except queue.Empty:
                return found

    def _loop(self, stop: threading.Event) -> None:
        batch, waiting = DecodeBatch(), deque()
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
        while waiting:
            p = waiting[0]
            if batch and (p.request.adapter != batch.adapter or len(batch) + p.request.n > self.max_batch_rows):
                return
            waiting.popleft()
            if not p.future.set_running_or_notify_cancel():
                continue
            batch.adapter = p.request.adapter
            try:
                with self._model_lock, torch.inference_mode():
                    self._use_adapter(p.request.adapter)
                    self._prefill(batch, p)
            except Exception as e:  # this request fails, the others go on
                p.future.set_exception(EngineError(f"generation failed: {type(e).__name__}: {e}"))

    def _prefill(self, batch: DecodeBatch, p: _Pending) -> None:
        """Feed the prompt (after its cached prefix), sample each row's first token, add live rows to the batch."""
        prompt = torch.tensor(p.request.prompt_ids, device=self.device)
        reused, prefix = self.prefix_cache.lookup(p.request.adapter, prompt)
        cache = GrowingCache(prefix) if prefix else None
        out = self.model(
            input_ids=prompt[reused:].unsqueeze(0), past_key_values=cache, use_cache=True, logits_to_keep=1
        )
        kv = cache_kv(out.past_key_values)
        self.prefix_cache.add(p.request.adapter, prompt, kv)
        p.rows = [self._row(p, j, prompt) for j in range(p.request.n)]
        logits = out.logits[:, -1, :].expand(len(p.rows), -1)  # (n, V)
        tokens = self._sample(p.rows, logits)
        live = [i for i, r in enumerate(p.rows) if r.finish is None]
        if live:
            batch.join([p.rows[i] for i in live], kv, tokens[live].unsqueeze(1))
        self._resolve_if_done(p)

    def _step_or_fail(self, batch: DecodeBatch) -> None:
        try:
            with self._model_lock, torch.inference_mode():
                self._use_adapter(batch.adapter)
                self._step(batch)
        except Exception as e:  # the rows in flight fail, the engine goes on
            _fail(_in_flight(batch), EngineError(f"generation failed: {type(e).__name__}: {e}"))
            batch.keep([])

    def _step(self, batch: DecodeBatch) -> None:
        """One decode step for every row in flight; finished rows leave the batch."""
        mask = torch.cat([batch.mask, torch.ones_like(batch.next_ids)], dim=1)  # (B, W + 1)
        positions = mask.sum(-1, keepdim=True) - 1  # (B, 1)
        out = self.model(input_ids=batch.next_ids, attention_mask=mask, position_ids=positions,
                         past_key_values=batch.cache, use_cache=True)  # fmt: skip
        batch.mask = mask
        batch.next_ids = self._sample(batch.rows, out.logits[:, -1, :]).unsqueeze(1)
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
        if all(r.finish is not None for r in p.rows) and not p.future.done():
            p.future.set_result([self._finish(r) for r in p.rows])

    def _row(self, p: _Pending, index: int, prompt: torch.Tensor) -> _Row:
        request, generator = p.request, None
        if request.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(request.seed + index)
        params = RowParams(request.temperature, request.top_p, request.top_k, request.repetition_penalty, generator)
        return _Row(request, params, p, prompt)

    def _use_adapter(self, adapter: str | None) -> None:
        """Make `adapter` (None: the base model) the active one; peft's switch costs 7-30 ms, so only on change."""
        if not self._adapters or adapter == self._active:
            return
        if adapter is None:
            self.model.base_model.disable_adapter_layers()
        else:
            if self._active is None or self._active is _UNKNOWN:
                self.model.base_model.enable_adapter_layers()
            self.model.set_adapter(adapter)
        self._active = adapter

    def _append(self, row: _Row, token: int, logprob: float) -> None:
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


def _fail(pendings: list[_Pending], error: Exception) -> None:
    for p in pendings:
        if not p.future.done():
            with contextlib.suppress(InvalidStateError):
                p.future.set_exception(error)


def _require_full_attention(config) -> None:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types = set(getattr(text, "layer_types", None) or ["full_attention"])
    windowed = getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True) is not False
    sliding = bool(windowed) or bool(types - {"full_attention"})
    if sliding:
        raise EngineError(
            f"the transformers engine serves full-attention models only; {config.model_type} has sliding-window "
            "layers. Use --engine vllm (engine='vllm') for it."
        )


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for s in stops if s and (i := text.find(s)) >= 0]
    return min(hits) if hits else None


def _eos_ids(model, tokenizer) -> tuple[int, ...]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the model has no EOS token id")
    return tuple(dict.fromkeys(ids))
