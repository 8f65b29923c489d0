"""`espalier.init()`: start the server as a background subprocess; `espalier.serve()`: run it here.

    info = espalier.init()            # {"base_url", "port", "api_key", "model"}
    lm = dspy.LM(f"openai/arbor:{info['model']}", provider=ArborProvider(),
                 api_base=info["base_url"], api_key=info["api_key"])

Departures from Arbor's `arbor.init()`:
1. Binds 127.0.0.1 on a free port by default, waits for `/health` with a timeout and fails
   with the server's log tail instead of returning a URL that is not up.
2. Every child started here is stopped at exit (atexit), along with its own children
   (vLLM, the trainer worker), so an interrupted notebook leaves no orphan engine.
3. The recipe builds its LM without an `api_key`, and LiteLLM's OpenAI client refuses to send
   a request without one. `init()` (and Espalier's `ArborProvider()`) set `OPENAI_API_KEY`
   when it is unset: to the server's key, or to a placeholder that a server without a key
   accepts. A key the user already set is never overwritten.
4. `base_url` ends with a slash, as Arbor's `init()` returns it: Arbor's client joins routes
   with `urljoin`, which drops the last path segment of a base without one.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from espalier.ports import free_port

_CHILDREN: list[subprocess.Popen] = []
NO_KEY = "espalier-no-key"  # what a client sends to a server without a key (any value is accepted)


def default_client_key(api_key: str | None = None) -> None:
    """Give OpenAI clients (LiteLLM under dspy.LM) a key when the user set none: `api_key`, else a placeholder."""
    os.environ.setdefault("OPENAI_API_KEY", api_key or os.environ.get("ESPALIER_API_KEY") or NO_KEY)


def _stop(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass


def shutdown() -> None:
    """Stop every server started by `init` in this process."""
    while _CHILDREN:
        _stop(_CHILDREN.pop())


atexit.register(shutdown)


def _exit_on_sigterm() -> None:
    """A SIGTERM'd parent skips atexit by default, orphaning its servers: make SIGTERM exit cleanly."""
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _server_args(model: str, engine: str, host: str, port: int, num_inference_gpus: int, **extra: Any) -> list[str]:
    args = ["--model", model, "--engine", engine, "--host", host, "--port", str(port),
            "--num-inference-gpus", str(num_inference_gpus)]
    for key, value in extra.items():
        flag = f"--{key.replace('_', '-')}"
        if value is True:
            args.append(flag)
        elif value is not None and value is not False:
            args += [flag, str(value)]
    return args


def _wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"the espalier server exited with code {proc.returncode}:\n{tail}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    _stop(proc)
    tail = log_path.read_text(errors="replace")[-4000:]
    raise TimeoutError(f"the espalier server was not healthy within {timeout:.0f} s:\n{tail}")


def init(
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct",
    engine: str = "auto",
    port: int | None = None,
    host: str = "127.0.0.1",
    api_key: str | None = None,
    num_inference_gpus: int = 0,
    timeout: float = 900.0,
    run_dir: str | Path | None = None,
    adapter: str | Path | None = None,
    record_trained: bool = False,
    train_processes: int | None = None,
    inference_replicas: int = 1,
) -> dict[str, Any]:
    """Start `python -m espalier.inference.server` in the background and wait until it is healthy.

    `record_trained=True` makes the trainer append every sequence it feeds to
    `run_dir/trained/step-N.jsonl`, to audit what was trained. `train_processes=N` trains with
    N CPU processes (torch distributed, gloo) instead of one; GPUs follow `num_training_gpus`.
    `inference_replicas=N` serves from N engine processes (`--inference-replicas`)."""
    port = port or free_port(host)
    _exit_on_sigterm()
    api_key = api_key if api_key is not None else os.environ.get("ESPALIER_API_KEY")
    log_dir = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="espalier-serve-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "server.log"
    args = _server_args(model, engine, host, port, num_inference_gpus, run_dir=log_dir, adapter=adapter,
                        engine_start_timeout=timeout, record_trained=record_trained,
                        train_processes=train_processes, inference_replicas=inference_replicas)
    env = dict(os.environ)
    if api_key:
        env["ESPALIER_API_KEY"] = api_key  # not on the command line, where `ps` shows it
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "espalier.inference.server", *args], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    _CHILDREN.append(proc)
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    url = f"http://{connect_host}:{port}"
    _wait_healthy(url, proc, log_path, timeout)
    default_client_key(api_key)
    return {"base_url": f"{url}/v1/", "port": port, "api_key": api_key, "model": model, "log": str(log_path),
            "pid": proc.pid}


def serve(
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct",
    engine: str = "auto",
    port: int | None = None,
    host: str = "127.0.0.1",
    api_key: str | None = None,
    num_inference_gpus: int = 0,
    run_dir: str | Path | None = None,
    adapter: str | Path | None = None,
    inference_replicas: int = 1,
) -> None:
    """Run the server in the foreground until interrupted."""
    from espalier.inference.server import serve_main

    args = _server_args(model, engine, host, port or 0, num_inference_gpus, run_dir=run_dir, adapter=adapter,
                        api_key=api_key, inference_replicas=inference_replicas)
    serve_main(args)
