"""`espalier.init()`: start the server as a background subprocess; `espalier.serve()`: run it here.

    info = espalier.init()            # {"base_url", "port", "api_key", "model"}
    lm = dspy.LM(f"openai/arbor:{info['model']}", provider=ArborProvider(),
                 api_base=info["base_url"], api_key=info["api_key"])

Departures from Arbor's `arbor.init()`:
1. Binds 127.0.0.1 on a free port by default, waits for `/health` with a timeout and fails
   with the server's log tail instead of returning a URL that is not up.
2. Every child started here is stopped at exit (atexit, and on SIGTERM), along with its own children
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
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

from espalier.inference.server_options import ServerOptions, server_argv, server_options
from espalier.ports import free_port

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


class ChildServers:
    """The servers `init` started in this process; the first one added arms the exit hooks.

    A SIGTERM'd parent skips atexit by default, orphaning its servers, so arming also makes
    SIGTERM exit cleanly (from the main thread, and only where no handler is set)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.armed = False

    def add(self, proc: subprocess.Popen) -> None:
        if not self.armed:
            self._arm()
        self.procs.append(proc)

    def shutdown(self) -> None:
        while self.procs:
            _stop(self.procs.pop())

    def _arm(self) -> None:
        import threading

        atexit.register(self.shutdown)
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        self.armed = True


CHILDREN = ChildServers()


def shutdown() -> None:
    """Stop every server started by `init` in this process."""
    CHILDREN.shutdown()


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


def init(model: str | None = None, options: ServerOptions | None = None, timeout: float = 900.0,
         **settings: Any) -> dict[str, Any]:
    """Start `python -m espalier.inference.server` in the background and wait until it is healthy.

    `settings` are the server's options (`ServerOptions`, the flags of `espalier serve`), e.g.
    `init(model=..., engine="transformers", inference_replicas=2)`: `record_trained=True` makes the
    trainer append every sequence it feeds to `run_dir/trained/step-N.jsonl`, `train_processes=N`
    trains with N CPU processes (torch distributed, gloo). Here `port` defaults to a free port, the
    key to $ESPALIER_API_KEY, `run_dir` to a new temporary directory, and `timeout` bounds the
    engine's start and the wait for health."""
    if options is None:  # init's own defaults: `timeout` for the engine's start too, a fresh run directory
        settings.setdefault("engine_start_timeout", timeout)
        settings["run_dir"] = settings.get("run_dir") or tempfile.mkdtemp(prefix="espalier-serve-")
    options = server_options(options, model=model, **settings)
    if options.port == 0:
        options = replace(options, port=free_port(options.host))
    options.run_dir.mkdir(parents=True, exist_ok=True)
    log_path = options.run_dir / "server.log"
    env = dict(os.environ)
    if options.api_key:
        env["ESPALIER_API_KEY"] = options.api_key  # not on the command line, where `ps` shows it
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "espalier.inference.server", *server_argv(options)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    CHILDREN.add(proc)
    connect_host = "127.0.0.1" if options.host in ("0.0.0.0", "") else options.host
    url = f"http://{connect_host}:{options.port}"
    _wait_healthy(url, proc, log_path, timeout)
    default_client_key(options.api_key)
    return {"base_url": f"{url}/v1/", "port": options.port, "api_key": options.api_key, "model": options.model,
            "log": str(log_path), "pid": proc.pid}


def serve(model: str | None = None, options: ServerOptions | None = None, **settings: Any) -> None:
    """Run the server in the foreground until interrupted; `settings` as for `init`."""
    from espalier.inference.server import serve_forever

    serve_forever(server_options(options, model=model, **settings))
