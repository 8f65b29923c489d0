"""The job's side of its trainer: one interface, `TrainerHandle`, in a separate process or in this one.

    handle = TrainerProcess(spec)        # or InProcessTrainer(spec)
    handle.start(timeout=900)            # the trainer is built (every rank)
    done = handle.call(StepCommand(...), timeout=3600, what="run a training step", expect=StepDone)
    handle.stop(grace=30)

`TrainerProcess` spawns `worker.worker_main` and speaks `protocol.py`'s messages over a pipe;
every wait has a timeout. `InProcessTrainer` builds the trainer here and runs each command
directly (no spawn, one process to debug; no timeout, and one rank only). Both raise the same
errors: `TrainerGone` (the process ended; a restart may help), `TrainerTimeout` (it did not
answer in time and was killed), `TrainerRefused` (it answered with a `WorkerError`).

Departures from Arbor:
1. A pipe of typed messages with a timeout on every wait, instead of ZMQ sockets polled by a
   thread with none: a trainer that dies or hangs is seen at once and said so.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from typing import Any, Protocol, TypeVar

from espalier.training.protocol import (
    Command,
    Ready,
    StopCommand,
    Stopped,
    WorkerError,
    WorkerSpec,
    receive_reply,
    send,
)

R = TypeVar("R")


class TrainerGone(RuntimeError):
    """The trainer process ended before it answered."""


class TrainerTimeout(RuntimeError):
    """The trainer did not answer within the timeout; it was killed."""


class TrainerRefused(RuntimeError):
    """The trainer answered with a `WorkerError`: kind "config" is a bad config, "trainer" anything else."""

    def __init__(self, error: WorkerError, what: str):
        super().__init__(f"could not {what}: {error.message}")
        self.kind = error.kind


class TrainerHandle(Protocol):
    def start(self, timeout: float) -> None:
        """Build the trainer; raises as `call` does."""

    def call(self, command: Command, timeout: float, what: str, expect: type[R]) -> R:
        """Run `command` and return its reply, of type `expect`."""

    @property
    def alive(self) -> bool: ...

    @property
    def exitcode(self) -> int | None: ...

    def stop(self, grace: float) -> None:
        """End the trainer: gracefully once a command in flight is answered (within `grace` s), else killed."""

    def kill(self) -> None:
        """End the trainer now."""


def _checked(reply: Any, what: str, expect: type[R]) -> R:
    if isinstance(reply, WorkerError):
        raise TrainerRefused(reply, what)
    if not isinstance(reply, expect):
        raise TypeError(f"the trainer answered {type(reply).__name__} where it owed {expect.__name__}")
    return reply


class TrainerProcess:
    """The trainer in a spawned worker process (its ranks' launcher with several ranks)."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self._busy = threading.Lock()  # one command on the pipe at a time; `stop` waits for it

    def start(self, timeout: float) -> None:
        from espalier.training.worker import worker_main

        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=worker_main, name="espalier-trainer", daemon=True, args=(child, self.spec))
        self._proc.start()
        child.close()
        try:
            self._exchange(None, timeout, "start the trainer", Ready)
        except TrainerRefused:
            self._proc.kill()
            raise

    @property
    def alive(self) -> bool:
        return self._proc.is_alive()

    @property
    def exitcode(self) -> int | None:
        return self._proc.exitcode

    def call(self, command: Command, timeout: float, what: str, expect: type[R]) -> R:
        with self._busy:
            return self._exchange(command, timeout, what, expect)

    def _exchange(self, command: Command | None, timeout: float, what: str, expect: type[R]) -> R:
        """Send `command` (None: only wait, for `Ready`) and return its reply."""
        if command is not None:
            try:
                send(self._conn, command)
            except OSError as e:  # BrokenPipeError, ConnectionResetError: it died before reading
                raise TrainerGone(f"the trainer process died (exit code {self.exitcode}) before it could {what}") from e
        self._wait(timeout, what)
        try:
            reply = receive_reply(self._conn)
        except (EOFError, OSError):
            self._proc.join(timeout=5)
            raise TrainerGone(f"the trainer process died (exit code {self.exitcode}) while trying to {what}") from None
        return _checked(reply, what, expect)

    def _wait(self, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not self._conn.poll(0.2):
            if not self._proc.is_alive() and not self._conn.poll(0):
                raise TrainerGone(f"the trainer process died (exit code {self.exitcode}) while trying to {what}")
            if time.monotonic() > deadline:
                self._proc.kill()
                raise TrainerTimeout(f"the trainer did not {what} within {timeout:.0f} s; it was stopped")

    def stop(self, grace: float) -> None:
        """Send `StopCommand` once the command in flight is answered, so every rank ends cleanly (another node's
        too, whose torchrun then exits 0); a trainer busy past `grace` s, or that does not stop, is killed."""
        if not self._busy.acquire(timeout=grace):
            self.kill()  # still busy (for a client that may be gone): its ranks elsewhere fail instead
            return
        try:
            if self._proc.is_alive():
                try:
                    self._exchange(StopCommand(), 60, "stop", Stopped)
                except (TrainerGone, TrainerTimeout, TrainerRefused, OSError):
                    pass  # it is being stopped either way
        finally:
            self._busy.release()
        self._proc.join(timeout=10)
        self.kill()

    def kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join(timeout=10)


class InProcessTrainer:
    """The trainer built in this process, each command run directly (`espalier serve --train-in-process`)."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec, self.trainer, self.recorder = spec, None, None
        self._busy = threading.Lock()

    def start(self, timeout: float) -> None:
        from espalier.training.worker import build_trainer, recorder_for

        if self.spec.processes > 1 or self.spec.nodes is not None:
            raise TrainerRefused(WorkerError("config", "an in-process trainer has one rank: train on several ranks "
                                                       "in a worker process (restart without --train-in-process)"),
                                 "start the trainer")
        self.recorder = recorder_for(self.spec, 0)
        self.trainer, error = build_trainer(self.spec, self.spec.device, None, self.recorder)
        if error is not None:
            raise TrainerRefused(error, "start the trainer")

    @property
    def alive(self) -> bool:
        return self.trainer is not None

    @property
    def exitcode(self) -> int | None:
        return None

    def call(self, command: Command, timeout: float, what: str, expect: type[R]) -> R:
        from espalier.training.worker import run_command

        with self._busy:
            if self.trainer is None:
                raise TrainerGone(f"the trainer was stopped, so it cannot {what}")
            return _checked(run_command(self.trainer, self.recorder, command), what, expect)

    def stop(self, grace: float) -> None:
        if self._busy.acquire(timeout=grace):  # a step in flight in another thread finishes first
            self._busy.release()
        self.kill()

    def kill(self) -> None:
        self.trainer = None
