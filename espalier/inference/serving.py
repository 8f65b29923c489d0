"""The served model: one engine, its adapters, and the names clients use for them.

Names: `<id>` is the current policy (the latest published adapter, or the base model before
the first one), `<id>@base` is the base model with no adapter, `<id>@<checkpoint>` is a
checkpoint's adapter. An `arbor:` or `openai/arbor:` prefix is accepted and ignored.

Departures from Arbor:
1. Publishing a new policy loads its adapter into the running engine under a fresh name and
   drops the previous one; the engine is never restarted and no weights are broadcast.
2. A dead engine is restarted on the next request (one restart at a time), with every
   adapter it had, and the request goes on; requests in flight when it died fail with 503.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from espalier.inference.engine import Engine, GeneratedSequence, GenerateRequest

log = logging.getLogger(__name__)


class UnknownModel(LookupError):
    pass


def strip_prefix(name: str) -> str:
    for prefix in ("openai/", "arbor:"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name


class ServedModel:
    def __init__(self, engine: Engine, model_id: str, aliases: tuple[str, ...] = ()):
        self.engine = engine
        self.model_id = model_id
        self.aliases = {model_id, *aliases}
        self.policy: str | None = None  # engine adapter name of the current policy
        self.checkpoints: dict[str, str] = {}  # checkpoint name -> engine adapter name
        self._version = 0
        self._lock = threading.Lock()  # adapter bookkeeping and restarts
        self.last_swap_ms: float | None = None

    def model_names(self) -> list[str]:
        return [self.model_id, f"{self.model_id}@base", *(f"{self.model_id}@{c}" for c in self.checkpoints)]

    def resolve(self, name: str) -> str | None:
        """The engine adapter for a client's model name (None = the base model)."""
        base, _, suffix = strip_prefix(name).partition("@")
        if base not in self.aliases:
            raise UnknownModel(f"unknown model {name!r}; this server serves {self.model_names()}")
        if not suffix:
            return self.policy
        if suffix == "base":
            return None
        if suffix in self.checkpoints:
            return self.checkpoints[suffix]
        raise UnknownModel(f"unknown checkpoint {suffix!r} for {base}; known: {sorted(self.checkpoints)}")

    def generate(self, request: GenerateRequest, timeout: float | None) -> list[GeneratedSequence]:
        self.ensure_alive()
        return self.engine.generate(request, timeout=timeout)

    def ensure_alive(self) -> None:
        if self.engine.alive():
            return
        with self._lock:
            if not self.engine.alive():
                log.warning("engine is not alive; restarting it with adapters %s", sorted(self.engine.adapters()))
                self.engine.restart()

    def publish(self, adapter_dir: Path) -> float:
        """Make an exported adapter the current policy; returns the swap time in ms."""
        self.ensure_alive()
        with self._lock:
            self._version += 1
            name = f"policy-{self._version}"
            start = time.perf_counter()
            self.engine.load_adapter(name, Path(adapter_dir), policy=True)
            previous, self.policy = self.policy, name
            if previous is not None and previous not in self.checkpoints.values():
                self.engine.unload_adapter(previous)
            self.last_swap_ms = (time.perf_counter() - start) * 1000
        log.info("published %s as %s in %.1f ms", adapter_dir, name, self.last_swap_ms)
        return self.last_swap_ms

    def add_checkpoint(self, checkpoint: str, adapter_dir: Path) -> str:
        """Serve a checkpoint's adapter as `<id>@<checkpoint>` (`<job_id>/<name>` for a job's); returns that name."""
        parts = checkpoint.split("/")
        if len(parts) > 2 or any(not p or p in ("base", ".", "..") or "@" in p for p in parts):
            raise ValueError(f"bad checkpoint name {checkpoint!r}: use [<job id>/]<name> of letters, digits, '-', '_'")
        self.ensure_alive()
        with self._lock:
            name = f"ckpt-{checkpoint.replace('/', '--')}"
            self.engine.load_adapter(name, Path(adapter_dir))
            self.checkpoints[checkpoint] = name
        return f"{self.model_id}@{checkpoint}"
