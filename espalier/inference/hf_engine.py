"""A plain transformers engine that batches concurrent requests: for tests and machines without vLLM.

A background thread takes the first waiting request, collects others for a few
milliseconds, groups them by adapter, left-pads them into one batch and decodes with a KV
cache. Every row keeps its own sampling parameters and seed (`sampling.py`).

Departures from Arbor / `transformers.generate`:
1. Rows of one forward pass carry different temperatures, top-p, top-k, penalties, seeds
   and stop strings; the token ids returned are exactly those sampled, EOS included.
2. LoRA adapters are peft adapters held in memory next to the base weights and switched
   per batch (`set_adapter` / `disable_adapter`); the base weights never move.
3. A batch that fails fails only its own requests, with the reason; a dead worker thread is
   brought back by `restart()` with the same model and adapters.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import warnings
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from espalier.inference.engine import EngineError, EngineUnavailable, GeneratedSequence, GenerateRequest
from espalier.inference.sampling import RowParams, sample_rows


@dataclass
class _Row:
    request: GenerateRequest
    params: RowParams
    tokens: list[int]
    logprobs: list[float]
    finish: str | None = None


@dataclass
class _Pending:
    request: GenerateRequest
    future: Future


class TransformersEngine:
    def __init__(self, model_path: Path, device: str = "cpu", max_batch_rows: int = 32, collect_ms: float = 5.0):
        self.model_path = Path(model_path)
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32).to(device).eval()
        self.max_model_len = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.max_batch_rows = max_batch_rows
        self.collect_s = collect_ms / 1000
        self._adapters: dict[str, Path] = {}
        self._model_lock = threading.Lock()  # held while a batch runs or an adapter is (un)loaded
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

    def unload_adapter(self, name: str) -> None:
        with self._model_lock:
            if name not in self._adapters:
                raise KeyError(f"adapter {name!r} is not loaded")
            self._delete_adapter(name)

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
        self._fail_waiting(EngineUnavailable("the transformers engine was stopped"))

    # ---- worker ----------------------------------------------------------------------

    def _delete_adapter(self, name: str) -> None:
        del self._adapters[name]
        if self._adapters:
            with warnings.catch_warnings():  # peft warns when the active adapter goes; we set one per batch
                warnings.simplefilter("ignore", UserWarning)
                self.model.delete_adapter(name)
        else:  # peft cannot delete its last adapter: drop the LoRA layers (no merge)
            self.model = self.model.unload().eval()

    def _fail_waiting(self, error: Exception) -> None:
        while True:
            try:
                self._queue.get_nowait().future.set_exception(error)
            except queue.Empty:
                return

    def _loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first] + self._collect()
            by_adapter: dict[str | None, list[_Pending]] = {}
            for p in batch:
                if p.future.set_running_or_notify_cancel():
                    by_adapter.setdefault(p.request.adapter, []).append(p)
            for adapter, group in by_adapter.items():
                self._run_group(adapter, group)

    def _collect(self) -> list[_Pending]:
        found: list[_Pending] = []
        deadline = time.monotonic() + self.collect_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                found.append(self._queue.get(timeout=left))
            except queue.Empty:
                break
        return found

    def _run_group(self, adapter: str | None, group: list[_Pending]) -> None:
        chunk: list[_Pending] = []
        for p in group + [None]:  # type: ignore[list-item]
            if p is None or sum(q.request.n for q in chunk) + p.request.n > self.max_batch_rows:
                if chunk:
                    self._run_chunk(adapter, chunk)
                chunk = []
            if p is not None:
                chunk.append(p)

    def _run_chunk(self, adapter: str | None, chunk: list[_Pending]) -> None:
        rows = [self._row(p.request, j) for p in chunk for j in range(p.request.n)]
        try:
            with self._model_lock, torch.inference_mode(), self._adapter_context(adapter):
                self._decode(rows)
        except Exception as e:  # the batch fails, the engine goes on
            for p in chunk:
                p.future.set_exception(EngineError(f"generation failed: {type(e).__name__}: {e}"))
            return
        i = 0
        for p in chunk:
            p.future.set_result([self._finish(r) for r in rows[i : i + p.request.n]])
            i += p.request.n

    def _row(self, request: GenerateRequest, index: int) -> _Row:
        generator = None
        if request.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(request.seed + index)
        params = RowParams(request.temperature, request.top_p, request.top_k, request.repetition_penalty, generator)
        return _Row(request, params, [], [])

    def _adapter_context(self, adapter: str | None):
        if not self._adapters:
            return contextlib.nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    def _decode(self, rows: list[_Row]) -> None:
        prompts = [torch.tensor(r.request.prompt_ids) for r in rows]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, L) left-padded
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, L)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = p
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        seen = [p.to(self.device) for p in prompts]
        cache, step_ids = None, ids
        for _ in range(max(r.request.max_tokens for r in rows)):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]  # (B, L or 1)
            out = self.model(
                input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
            )
            cache = out.past_key_values
            tokens, logprobs = sample_rows(out.logits[:, -1, :], seen, [r.params for r in rows])  # (B,), (B,)
            for i, r in enumerate(rows):
                if r.finish is None:
                    self._append(r, int(tokens[i]), float(logprobs[i]))
                    seen[i] = torch.cat([seen[i], tokens[i : i + 1]])
            if all(r.finish is not None for r in rows):
                return
            step_ids = tokens.unsqueeze(1)  # (B, 1)
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)

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
