"""An engine in a child process: `ProcessEngine` hosts one `TransformersEngine` in its own OS process.

    server process                                   engine process (spawned, one per replica)
    ProcessEngine ──Generate / LoadAdapter / ...──▶ host_main: TransformersEngine
                  ◀──Done / Failed (by call id)───

Several requests are in flight at once: each command carries a call id, the host serves each in
its own thread (the engine batches them), and a reader thread in the server resolves each
call's future from its reply. Messages are pickled frozen dataclasses, checked on arrival, as
on the trainer's pipe (`espalier/pipes.py`).

Departures from an in-process engine:
1. A replica that dies (kill -9, OOM) takes only its own requests with it: they fail with
   `EngineUnavailable` at once (the pipe closes), which `ReplicaSet` retries on another replica.
2. The host exits when its pipe closes, so a server that dies leaves no engine behind; a host
   whose engine thread died exits too, so "alive" is "the process runs".
3. A request's `cancel` event does not cross the pipe: the server polls it and sends `Cancel`.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import os
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Literal

from espalier.inference.engine import EngineError, EngineUnavailable, GeneratedSequence, GenerateRequest
from espalier.pipes import receive_typed, send_typed

log = logging.getLogger(__name__)
POLL_S = 0.5  # how often a waiting call checks its request's cancel event
CALL_GRACE_S = 10.0  # a generate call waits this much longer than the timeout it gave the host


@dataclass(frozen=True)
class HostSpec:
    """What an engine process is started with (the `TransformersEngine` arguments)."""

    model_path: Path
    device: str = "cpu"
    threads: int | None = None  # torch threads of the process; None: torch's default
    prefill_bf16: bool | None = None  # None: the host measures (precision.fast_bf16)
    max_batch_rows: int = 32


# ---- commands: server -> host ---------------------------------------------------------------


@dataclass(frozen=True)
class Generate:
    call: int
    request: GenerateRequest  # without its cancel event
    timeout: float | None


@dataclass(frozen=True)
class LoadAdapter:
    call: int
    name: str
    path: Path
    policy: bool = False


@dataclass(frozen=True)
class UnloadAdapter:
    call: int
    name: str


@dataclass(frozen=True)
class Cancel:
    """Nobody waits for call `call` any more: drop its rows."""

    call: int


@dataclass(frozen=True)
class Stop:
    """Close the engine and exit."""


# ---- replies: host -> server ----------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    max_model_len: int


@dataclass(frozen=True)
class Done:
    call: int
    sequences: tuple[GeneratedSequence, ...] = ()


FailureKind = Literal["unavailable", "engine", "missing", "invalid"]
ERRORS: dict[str, type[Exception]] = {"unavailable": EngineUnavailable, "engine": EngineError, "missing": KeyError,
                                      "invalid": ValueError}
KINDS: tuple[tuple[FailureKind, type | tuple[type, ...]], ...] = (  # the host's exception -> kind; first match wins
    ("unavailable", EngineUnavailable), ("engine", EngineError), ("missing", KeyError), ("invalid", (ValueError, OSError)))


@dataclass(frozen=True)
class Failed:
    """Call `call` (0: the engine's start) raised; `kind` names the exception the server raises for it."""

    call: int
    kind: FailureKind
    message: str


COMMANDS = (Generate, LoadAdapter, UnloadAdapter, Cancel, Stop)
REPLIES = (Started, Done, Failed)


def _failure(call: int, e: BaseException) -> Failed:
    kind = next((k for k, types in KINDS if isinstance(e, types)), "engine")
    return Failed(call, kind, str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e))


# ---- the host (child process) ---------------------------------------------------------------


def host_main(conn: Connection, spec: HostSpec) -> None:
    """Build the engine, answer `Started`, then serve commands until `Stop` or until the pipe closes."""
    import signal

    import torch

    from espalier.inference.hf_engine import TransformersEngine

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C of `espalier serve` reaches us too: the server closes us
    if spec.threads:
        torch.set_num_threads(spec.threads)
    try:
        engine = TransformersEngine(spec.model_path, spec.device, spec.max_batch_rows, prefill_bf16=spec.prefill_bf16)
    except Exception as e:
        send_typed(conn, _failure(0, e), REPLIES)
        return
    lock, cancels = threading.Lock(), {}

    def reply(message: Started | Done | Failed) -> None:
        with lock:
            try:
                send_typed(conn, message, REPLIES)
            except OSError:  # the server is gone; the main loop sees it too
                pass

    def serve(command: Generate | LoadAdapter | UnloadAdapter) -> None:
        try:
            reply(Done(command.call, _run(engine, command, cancels.get(command.call))))
        except Exception as e:
            reply(_failure(command.call, e))
            if not engine.alive():  # a dead engine thread: exit, so that the server restarts this replica
                os._exit(3)
        finally:
            cancels.pop(command.call, None)

    reply(Started(engine.max_model_len))
    while True:
        try:
            command = receive_typed(conn, COMMANDS)
        except (EOFError, OSError):  # the server died: end now, without waiting for the requests in flight
            os._exit(0)
        if isinstance(command, Stop):
            engine.close()
            return
        if isinstance(command, Cancel):
            if (event := cancels.get(command.call)) is not None:
                event.set()
            continue
        if isinstance(command, Generate):
            cancels[command.call] = threading.Event()
        threading.Thread(target=serve, args=(command,), name=f"espalier-call-{command.call}", daemon=True).start()


def _run(engine, command: Generate | LoadAdapter | UnloadAdapter,
         cancel: threading.Event | None) -> tuple[GeneratedSequence, ...]:
    if isinstance(command, Generate):
        return tuple(engine.generate(replace(command.request, cancel=cancel), timeout=command.timeout))
    if isinstance(command, LoadAdapter):
        engine.load_adapter(command.name, command.path, command.policy)
    else:
        engine.unload_adapter(command.name)
    return ()


# ---- the client (server process) ------------------------------------------------------------


class ProcessEngine:
    """The Engine protocol over one engine process; `restart()` starts a new process with the same adapters."""

    def __init__(self, model_path: Path, device: str = "cpu", threads: int | None = None,
                 prefill_bf16: bool | None = None, max_batch_rows: int = 32, start_timeout: float = 900.0):
        from transformers import AutoTokenizer

        self.model_path = Path(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.spec = HostSpec(self.model_path, device, threads, prefill_bf16, max_batch_rows)
        self.start_timeout = start_timeout
        self._adapters: dict[str, Path] = {}
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()  # one writer on the pipe; also orders registering a call against EOF
        self._lock = threading.Lock()  # adapter (un)loads and restarts
        self._closed = False
        self._start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=host_main, args=(child, self.spec), name="espalier-engine", daemon=True)
        self._proc.start()
        child.close()
        self._calls: dict[int, Future] = {}
        self._gone = threading.Event()
        self.max_model_len = self._wait_started().max_model_len
        threading.Thread(target=self._read, args=(self._conn, self._calls, self._gone), name="espalier-engine-reader",
                         daemon=True).start()
        for name, path in self._adapters.items():
            self._call(LoadAdapter(next(self._ids), name, path), 120.0)

    def _wait_started(self) -> Started:
        deadline = time.monotonic() + self.start_timeout
        while not self._conn.poll(0.2):
            if not self._proc.is_alive() and not self._conn.poll(0):
                raise EngineUnavailable(f"the engine process exited with code {self._proc.exitcode} while starting")
            if time.monotonic() > deadline:
                self._kill()
                raise EngineUnavailable(f"the engine process did not start within {self.start_timeout:.0f} s")
        try:
            reply = receive_typed(self._conn, REPLIES)
        except (EOFError, OSError):
            self._proc.join(timeout=5)
            raise EngineUnavailable(f"the engine process exited with code {self._proc.exitcode} while starting") from None
        if isinstance(reply, Failed):
            self._kill()
            raise ERRORS[reply.kind](f"the engine could not start: {reply.message}")
        return reply

    def _read(self, conn: Connection, calls: dict[int, Future], gone: threading.Event) -> None:
        """Resolve each call's future from its reply; when the pipe closes, fail every call still open."""
        try:
            while True:
                reply = receive_typed(conn, REPLIES)
                future = calls.pop(reply.call, None)
                if future is None:  # a call that timed out, or the reply to a Stop
                    continue
                if isinstance(reply, Done):
                    future.set_result(list(reply.sequences))
                else:
                    future.set_exception(ERRORS[reply.kind](reply.message))
        except (EOFError, OSError):
            pass
        with self._send_lock:
            gone.set()
        self._proc.join(timeout=2)
        error = EngineUnavailable(f"the engine process {self._proc.pid} exited (code {self._proc.exitcode})")
        for future in list(calls.values()):
            if not future.done():
                future.set_exception(error)
        calls.clear()

    def _post(self, message: Cancel | Stop) -> None:
        """Send a message that has no reply; a closed pipe is ignored (the host is gone, nothing to stop)."""
        with self._send_lock:
            if not self._gone.is_set():
                try:
                    send_typed(self._conn, message, COMMANDS)
                except OSError:
                    pass

    def _submit(self, message: Generate | LoadAdapter | UnloadAdapter) -> Future:
        """Register the call's future and send it; raises EngineUnavailable when the host is gone."""
        future: Future = Future()
        with self._send_lock:
            if self._gone.is_set() or self._closed:
                raise EngineUnavailable("the engine process is not running")
            self._calls[message.call] = future
            try:
                send_typed(self._conn, message, COMMANDS)
            except OSError as e:
                self._calls.pop(message.call, None)
                raise EngineUnavailable(f"the engine process is gone: {e}") from e
        return future

    def _call(self, message: Generate | LoadAdapter | UnloadAdapter, timeout: float | None,
              cancel: threading.Event | None = None) -> list[GeneratedSequence]:
        """Send `message` and wait for its reply; a set `cancel` is forwarded, a timeout cancels the call."""
        future = self._submit(message)
        deadline = None if timeout is None else time.monotonic() + timeout
        cancelled = False
        while True:
            try:
                return future.result(timeout=POLL_S)
            except FutureTimeout:
                pass
            expired = deadline is not None and time.monotonic() > deadline
            if (expired or (cancel is not None and cancel.is_set())) and not cancelled:
                cancelled = True
                self._post(Cancel(message.call))
            if expired:
                self._calls.pop(message.call, None)
                raise EngineError(f"the engine process did not answer {type(message).__name__} within {timeout} s")

    def _kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join(timeout=10)

    # ---- Engine protocol ---------------------------------------------------------------

    def generate(self, request: GenerateRequest, timeout: float | None = None) -> list[GeneratedSequence]:
        if request.adapter is not None and request.adapter not in self._adapters:
            raise EngineError(f"adapter {request.adapter!r} is not loaded")
        message = Generate(next(self._ids), replace(request, cancel=None), timeout)
        return self._call(message, None if timeout is None else timeout + CALL_GRACE_S, request.cancel)

    def load_adapter(self, name: str, path: Path, policy: bool = False) -> None:
        with self._lock:
            self._call(LoadAdapter(next(self._ids), name, Path(path), policy), 120.0)
            self._adapters[name] = Path(path)

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if name not in self._adapters:
                raise KeyError(f"adapter {name!r} is not loaded")
            self._call(UnloadAdapter(next(self._ids), name), 120.0)
            del self._adapters[name]

    def adapters(self) -> dict[str, Path]:
        return dict(self._adapters)

    def alive(self) -> bool:
        return not self._closed and not self._gone.is_set() and self._proc.is_alive()

    def restart(self) -> None:
        with self._lock:
            self._kill()
            self._closed = False
            self._start()

    def close(self) -> None:
        if self._closed:
            return
        self._post(Stop())
        self._closed = True
        self._proc.join(timeout=30)
        self._kill()
        self._conn.close()
