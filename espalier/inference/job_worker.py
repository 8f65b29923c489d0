"""The trainer worker process of a GRPO job: owns the `GRPOTrainer`, obeys commands on a pipe.

Messages in: `("step", [group dicts], export_dir, record_path | None)`, `("checkpoint", directory)`,
`("export", directory)`, `("stop",)`. Messages out: `("ok", payload)` or
`("error", kind, message)` where kind is "config" for a bad train_kwargs (-> HTTP 400) and
"trainer" otherwise. The process exits on "stop" or when the pipe closes.

Departures from Arbor:
1. One process per job talked to over a pipe with timeouts on the parent side, instead of
   ZMQ sockets and a polling thread with no timeouts: if this process dies the parent sees
   it at once and reports it.
"""

from __future__ import annotations

import importlib
import traceback
from pathlib import Path
from typing import Any

from espalier.types import Group

DEFAULT_FACTORY = "espalier.inference.job_worker:build_trainer"


def build_trainer(model_path: Path, train_kwargs: dict[str, Any], device: str):
    """The real trainer, per the DESIGN.md contract."""
    from espalier.config import TrainConfig
    from espalier.training import GRPOTrainer

    return GRPOTrainer(model_path, TrainConfig.from_kwargs(train_kwargs), device=device)


def _load(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _handle(trainer, message: tuple) -> Any:
    command = message[0]
    if command == "step":
        groups = [Group.from_dict(g) for g in message[1]]
        trainer.record_path = Path(message[3]) if len(message) > 3 and message[3] else None
        metrics = trainer.train_step(groups)
        adapter = trainer.export_adapter(Path(message[2]))
        return {"metrics": [m.to_dict() for m in metrics], "adapter": str(adapter),
                "optimizer_steps": int(trainer.optimizer_steps)}
    if command == "checkpoint":
        directory = Path(message[1])
        trainer.save_checkpoint(directory)
        adapter = directory / "adapter"  # GRPOTrainer.save_checkpoint writes the adapter there
        if not (adapter / "adapter_config.json").exists():
            adapter = trainer.export_adapter(adapter)
        return {"checkpoint": str(directory), "adapter": str(adapter)}
    if command == "export":
        return {"adapter": str(trainer.export_adapter(Path(message[1])))}
    raise ValueError(f"unknown command {command!r}")


def worker_main(conn, factory: str, model_path: str, train_kwargs: dict[str, Any], device: str) -> None:
    try:
        trainer = _load(factory)(Path(model_path), train_kwargs, device)
    except ValueError as e:
        conn.send(("error", "config", str(e)))
        return
    except Exception as e:
        conn.send(("error", "trainer", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        return
    conn.send(("ok", {"ready": True}))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message[0] == "stop":
            conn.send(("ok", {"stopped": True}))
            return
        try:
            conn.send(("ok", _handle(trainer, message)))
        except Exception as e:
            conn.send(("error", "trainer", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
