"""Several engine replicas behind one server: `ReplicaSet` is the Engine protocol over N engines.

`serve --inference-replicas N` starts N engines (each its own process: `engine_process.ProcessEngine`
for the transformers engine, a vLLM server each for vLLM) and this set spreads requests over them:
each request goes to the live replica with the fewest requests in flight (ties: the one given
fewest so far), so a GRPO step's rollouts run on all of them at once.

1. Adapters are the set's: `load_adapter` / `unload_adapter` return once every live replica has
   applied them, so a published policy is served by all replicas before the next step's
   requests. A replica that is restarting gets the set's adapters before it takes requests.
2. A replica that dies during a request (`EngineUnavailable`, or an `EngineError` after which it
   is not alive) is taken out, restarted in the background (a new engine from `start`, with the
   current adapters), and the request is retried on another live replica: the step goes on.
   Any other error is the request's own and is raised as it is.
3. A replica whose restart fails is tried again on a later request, no sooner than a backoff
   (1 s, doubling, at most a minute). `alive()` is true while one replica serves; `restart()`
   (what `ServedModel` calls when none does) restarts the dead ones and waits for them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from espalier.inference.engine import Engine, EngineError, EngineUnavailable, GeneratedSequence, GenerateRequest

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 60.0
RESTART_WAIT_S = 900.0  # how long `restart()` waits for the dead replicas to come back


@dataclass(frozen=True)
class ReplicaStatus:
    """One replica as `/health` shows it."""

    index: int
    alive: bool
    restarting: bool
    pid: int | None
    in_flight: int  # requests it is generating now
    served: int  # requests it completed
    lost: int  # requests that failed on it because it died (each retried on another replica)
    restarts: int
    error: str | None  # why it last died or failed to restart


@dataclass
class _Replica:
    index: int
    engine: Engine | None
    in_flight: int = 0
    given: int = 0
    served: int = 0
    lost: int = 0
    restarts: int = 0
    failures: int = 0  # restarts that failed in a row (sets the backoff)
    not_before: float = 0.0  # time.monotonic() before which no restart is tried
    error: str | None = None
    thread: threading.Thread | None = None  # its restart, while it runs

    def serving(self) -> bool:
        return self.thread is None and self.engine is not None and self.engine.alive()


class ReplicaSet:
    def __init__(self, start: Callable[[int], Engine], count: int):
        """Start `count` engines at once, `start(i)` being replica i; if one fails to start, the others are closed."""
        if count < 1:
            raise ValueError(f"a replica set needs at least one replica, got {count}")
        self._start = start
        with ThreadPoolExecutor(count) as pool:
            futures = [pool.submit(start, i) for i in range(count)]
        engines = [f.result() if f.exception() is None else None for f in futures]
        if None in engines:
            for engine in engines:
                if engine is not None:
                    engine.close()
            raise next(f.exception() for f in futures if f.exception() is not None)
        self._replicas = [_Replica(i, engine) for i, engine in enumerate(engines)]
        first = engines[0]
        self.max_model_len = first.max_model_len
        self.tokenizer = first.tokenizer
        self.model_path = first.model_path  # type: ignore[attr-defined]
        self._adapters: dict[str, Path] = {}
        self._policy: str | None = None  # the adapter loaded with policy=True
        self._lock = threading.Lock()  # the replicas' counters and states
        self._adapter_lock = threading.Lock()  # adapter changes, and a restarted replica's joining
        self._closed = False

    # ---- requests ----------------------------------------------------------------------

    def generate(self, request: GenerateRequest, timeout: float | None = None) -> list[GeneratedSequence]:
        deadline = None if timeout is None else time.monotonic() + timeout
        tried: set[int] = set()
        while True:
            replica, engine = self._acquire(tried)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                sequences = engine.generate(request, timeout=left)
            except EngineError as e:
                died = isinstance(e, EngineUnavailable) or not engine.alive()
                self._release(replica, served=False, lost=died)
                if not died:
                    raise  # the request failed, not the replica
                log.warning("inference replica %d died during a request (%s); retrying it on another one",
                            replica.index, e)
                self._lose(replica, engine, e)
                tried.add(replica.index)
                continue
            self._release(replica, served=True, lost=False)
            return sequences

    def _acquire(self, tried: set[int]) -> tuple[_Replica, Engine]:
        """The live replica (not in `tried`) with the fewest requests in flight; dead ones start restarting."""
        with self._lock:
            for replica in self._replicas:
                if replica.thread is None and not replica.serving():
                    self._begin_restart(replica, "it was found dead")
            live = [r for r in self._replicas if r.serving() and r.index not in tried]
            if not live:
                states = ", ".join(f"{r.index}: {'restarting' if r.thread else 'dead'}" for r in self._replicas
                                   if not r.serving())
                raise EngineUnavailable(f"no inference replica can take the request ({states})")
            replica = min(live, key=lambda r: (r.in_flight, r.given))
            replica.in_flight += 1
            replica.given += 1
            return replica, replica.engine  # type: ignore[return-value]

    def _release(self, replica: _Replica, served: bool, lost: bool) -> None:
        with self._lock:
            replica.in_flight -= 1
            replica.served += served
            replica.lost += lost

    def _lose(self, replica: _Replica, engine: Engine, error: BaseException) -> None:
        """`engine` died: restart its replica (once, whoever notices first)."""
        with self._lock:
            if replica.engine is engine and replica.thread is None:
                self._begin_restart(replica, str(error), force=True)

    # ---- restarts ----------------------------------------------------------------------

    def _begin_restart(self, replica: _Replica, reason: str, force: bool = False) -> None:
        """Start restarting `replica` in the background (the caller holds `_lock`)."""
        if self._closed or (not force and time.monotonic() < replica.not_before):
            return
        replica.error = reason
        old, replica.engine = replica.engine, None
        replica.thread = threading.Thread(target=self._restart, args=(replica, old), daemon=True,
                                          name=f"espalier-replica-{replica.index}-restart")
        replica.thread.start()

    def _restart(self, replica: _Replica, old: Engine | None) -> None:
        """Close the dead engine, start a new one, give it the set's adapters, then let it take requests."""
        engine = None
        try:
            if old is not None:
                old.close()
            log.warning("restarting inference replica %d (%s)", replica.index, replica.error)
            engine = self._start(replica.index)
            if self._join(replica, engine):
                log.warning("inference replica %d is back with adapters %s", replica.index, sorted(self._adapters))
            else:
                engine.close()  # the set was closed meanwhile
        except Exception as e:
            log.exception("inference replica %d could not be restarted", replica.index)
            if engine is not None:
                engine.close()
            with self._lock:
                replica.failures += 1
                replica.not_before = time.monotonic() + min(MAX_BACKOFF_S, 2.0 ** (replica.failures - 1))
                replica.error, replica.thread = f"restart failed: {type(e).__name__}: {e}", None

    def _join(self, replica: _Replica, engine: Engine) -> bool:
        """Load the set's adapters into a restarted replica's engine and let it take requests (False: closed)."""
        with self._adapter_lock:  # no adapter change between loading them and taking requests
            for name, path in sorted(self._adapters.items(), key=lambda item: item[0] != self._policy):
                engine.load_adapter(name, path, name == self._policy)
            with self._lock:
                if self._closed:
                    return False
                replica.engine, replica.thread = engine, None
                replica.restarts, replica.failures = replica.restarts + 1, 0
                return True

    def restart(self) -> None:
        """Restart every dead replica and wait for them (at most RESTART_WAIT_S); EngineUnavailable if none serves."""
        with self._lock:
            for replica in self._replicas:
                if replica.thread is None and not replica.serving():
                    self._begin_restart(replica, replica.error or "it was found dead", force=True)
            threads = [r.thread for r in self._replicas if r.thread is not None]
        deadline = time.monotonic() + RESTART_WAIT_S
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if not self.alive():
            errors = "; ".join(f"{r.index}: {r.error}" for r in self._replicas)
            raise EngineUnavailable(f"no inference replica could be restarted ({errors})")

    # ---- adapters ----------------------------------------------------------------------

    def load_adapter(self, name: str, path: Path, policy: bool = False) -> None:
        """Load on every live replica (in parallel); returns once all have it. On an error no replica keeps it."""
        with self._adapter_lock:
            errors = self._on_live(lambda engine: engine.load_adapter(name, Path(path), policy))
            if errors:
                self._on_live(lambda engine: self._undo_load(engine, name, policy))
                raise errors[0]
            self._adapters[name] = Path(path)
            self._policy = name if policy else (None if name == self._policy else self._policy)

    def _undo_load(self, engine: Engine, name: str, policy: bool) -> None:
        """Take back a load that other replicas refused; a policy's by making the previous policy the policy again."""
        if name not in engine.adapters():
            return
        if policy and self._policy not in (None, name):
            engine.load_adapter(self._policy, self._adapters[self._policy], policy=True)
        engine.unload_adapter(name)

    def unload_adapter(self, name: str) -> None:
        with self._adapter_lock:
            if name not in self._adapters:
                raise KeyError(f"adapter {name!r} is not loaded")
            del self._adapters[name]
            self._policy = None if name == self._policy else self._policy
            if errors := self._on_live(lambda engine: engine.unload_adapter(name)):
                raise errors[0]

    def _on_live(self, apply: Callable[[Engine], object]) -> list[BaseException]:
        """`apply` to every live replica at once; returns the errors of those that are still alive (a replica that
        died meanwhile is restarted, and gets the set's adapters then)."""
        with self._lock:
            live = [(r, r.engine) for r in self._replicas if r.serving()]
        with ThreadPoolExecutor(max(1, len(live))) as pool:
            futures = [pool.submit(apply, engine) for _, engine in live]
        errors = []
        for (replica, engine), future in zip(live, futures, strict=True):
            if (error := future.exception()) is None:
                continue
            if engine.alive():
                errors.append(error)
            else:
                self._lose(replica, engine, error)
        return errors

    def adapters(self) -> dict[str, Path]:
        return dict(self._adapters)

    # ---- state -------------------------------------------------------------------------

    def alive(self) -> bool:
        with self._lock:
            return not self._closed and any(r.serving() for r in self._replicas)

    def status(self) -> list[ReplicaStatus]:
        with self._lock:
            return [ReplicaStatus(r.index, r.serving(), r.thread is not None, getattr(r.engine, "pid", None),
                                  r.in_flight, r.served, r.lost, r.restarts, r.error) for r in self._replicas]

    @property
    def engines(self) -> Sequence[Engine | None]:
        """Each replica's engine now (None while it restarts): tests send requests to one replica through it."""
        return [r.engine for r in self._replicas]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            engines = [r.engine for r in self._replicas if r.engine is not None]
            threads = [r.thread for r in self._replicas if r.thread is not None]
        with ThreadPoolExecutor(max(1, len(engines))) as pool:
            list(pool.map(lambda engine: engine.close(), engines))
        for thread in threads:
            thread.join(timeout=60)
