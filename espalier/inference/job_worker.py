"""The trainer worker process of a GRPO job: owns the `GRPOTrainer`, obeys commands on a pipe.

Messages in: `("step", [group dicts], export_dir, record_path | None, state_dir | None)`,
`("checkpoint", directory)`, `("resume", directory)` (a restarted worker loads the saved state),
`("stop",)`. Messages out: `("ok", payload)` or
`("error", kind, message)` where kind is "config" for a bad train_kwargs (-> HTTP 400) and
"trainer" otherwise. The process exits on "stop" or when the pipe closes.

With `processes > 1` this process is only a launcher: it starts the ranks through
`espalier.training.distributed.launch` (CUDA_VISIBLE_DEVICES set to the planned devices, or
hidden for CPU ranks) and waits for them. Rank 0 owns the pipe: it receives each command and
broadcasts it to the other ranks, every rank runs it on its trainer (the trainer writes
adapters and checkpoints from rank 0 only, behind a barrier), and rank 0 replies.

Departures from Arbor:
1. One process per job talked to over a pipe with timeouts on the parent side, instead of
   ZMQ sockets and a polling thread with no timeouts: if this process dies the parent sees
   it at once and reports it.
2. Several ranks: a rank that fails or dies ends every rank and this process (nonzero exit),
   so the job reports "failed" instead of hanging in a collective; a trainer error on any
   rank is therefore fatal to the job, where one process answers it and keeps going.
3. While the server sends nothing, rank 0 broadcasts a heartbeat every `HEARTBEAT_S`, so the
   other ranks' wait never reaches the process group's collective timeout (rollouts take long).
4. With `record_path`, rank r > 0 records its share of the sequences to `<stem>.rank<r>.jsonl`.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from espalier.types import Group

DEFAULT_FACTORY = "espalier.inference.job_worker:build_trainer"
HEARTBEAT_S = 60.0


def build_trainer(model_path: Path, train_kwargs: dict[str, Any], device: str, processes=None):
    """The real trainer, per the DESIGN.md contract; `processes` is given on several ranks."""
    from espalier.config import TrainConfig
    from espalier.training import GRPOTrainer

    return GRPOTrainer(model_path, TrainConfig.from_kwargs(train_kwargs), device=device, processes=processes)


def _load(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _trainer_error(e: Exception) -> tuple:
    return ("error", "trainer", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")


def _start(factory: str, model_path: str, train_kwargs: dict[str, Any], device: str, processes=None):
    """(trainer, None), or (None, an error reply)."""
    extra = () if processes is None else (processes,)
    try:
        return _load(factory)(Path(model_path), train_kwargs, device, *extra), None
    except ValueError as e:
        return None, ("error", "config", str(e))
    except Exception as e:
        return None, _trainer_error(e)


def _handle(trainer, message: tuple) -> Any:
    command = message[0]
    if command == "step":
        groups = [Group.from_dict(g) for g in message[1]]
        trainer.record_path = Path(message[3]) if len(message) > 3 and message[3] else None
        metrics = trainer.train_step(groups)
        adapter = trainer.export_adapter(Path(message[2]))
        if len(message) > 4 and message[4]:
            trainer.save_checkpoint(Path(message[4]))  # what a restarted worker resumes from (job.py)
        return {"metrics": [m.to_dict() for m in metrics], "adapter": str(adapter),
                "optimizer_steps": int(trainer.optimizer_steps)}
    if command == "resume":
        trainer.load_checkpoint(Path(message[1]))
        return {"optimizer_steps": int(trainer.optimizer_steps)}
    if command == "checkpoint":
        directory = Path(message[1])
        trainer.save_checkpoint(directory)
        adapter = directory / "adapter"  # GRPOTrainer.save_checkpoint writes the adapter there (after a barrier)
        if not (adapter / "adapter_config.json").exists():
            adapter = trainer.export_adapter(adapter)
        return {"checkpoint": str(directory), "adapter": str(adapter)}
    raise ValueError(f"unknown command {command!r}")


def _run(trainer, message: tuple) -> tuple:
    try:
        return ("ok", _handle(trainer, message))
    except Exception as e:
        return _trainer_error(e)


def _receive(conn) -> tuple | None:
    """The next command; None when the server closed the pipe."""
    try:
        return conn.recv()
    except EOFError:
        return None


def worker_main(conn, factory: str, model_path: str, train_kwargs: dict[str, Any], device: str,
                processes: int = 1, visible_devices: str | None = None) -> None:
    _exit_with_parent()  # a killed server must not leave its trainer running (and writing adapters)
    if processes > 1:
        _launch_ranks(conn, factory, model_path, train_kwargs, processes, visible_devices)
        return
    trainer, error = _start(factory, model_path, train_kwargs, device)
    conn.send(error or ("ok", {"ready": True}))
    while error is None:
        message = _receive(conn)
        if message is None or message[0] == "stop":
            if message is not None:
                conn.send(("ok", {"stopped": True}))
            return
        conn.send(_run(trainer, message))


# ---- several ranks -----------------------------------------------------------------------


def _launch_ranks(conn, factory: str, model_path: str, train_kwargs: dict[str, Any], processes: int,
                  visible_devices: str | None) -> None:
    """Start the ranks and wait; a failed rank raises here, so this process exits nonzero."""
    import multiprocessing

    from espalier.training.distributed import launch

    multiprocessing.current_process().daemon = False  # the job starts this process as a daemon; ranks are children
    if visible_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices  # "" = CPU ranks
    launch(rank_main, processes, args=(conn, factory, model_path, train_kwargs))


def _exit_with_parent() -> None:
    """End this process if its parent (the server, or the ranks' launcher) dies, even while the main thread
    is busy in a step or blocked in a collective."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="espalier-parent-watch", daemon=True).start()


def rank_main(conn, factory: str, model_path: str, train_kwargs: dict[str, Any]) -> None:
    """One rank: build the trainer, agree on the start with the other ranks, then obey rank 0."""
    import torch
    import torch.distributed as dist

    from espalier.training.distributed import init_processes, worker_device

    _exit_with_parent()
    processes = init_processes()
    device = worker_device()
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if processes.rank != 0:
        conn.close()
        conn = None
    trainer, error = _start(factory, model_path, train_kwargs, device, processes)
    errors: list[Any] = [None] * processes.world_size
    dist.all_gather_object(errors, error)
    error = next((e for e in errors if e is not None), None)
    if conn is not None:
        conn.send(error or ("ok", {"ready": True}))
    if error is None:
        _rank_loop(conn, trainer, processes.rank, torch.device(device))


def _next_command(conn, device) -> tuple | None:
    """Rank 0 reads the pipe (a heartbeat while it is quiet) and every rank gets the same command."""
    import torch.distributed as dist

    message: tuple | None = ("heartbeat",)
    if conn is not None and conn.poll(HEARTBEAT_S):
        message = _receive(conn)
    box = [message]
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


def _for_rank(message: tuple, rank: int) -> tuple:
    if rank == 0 or message[0] != "step" or len(message) < 4 or not message[3]:
        return message
    record = Path(message[3])
    return (*message[:3], str(record.with_name(f"{record.stem}.rank{rank}{record.suffix}")), *message[4:])


def _rank_loop(conn, trainer, rank: int, device) -> None:
    while True:
        message = _next_command(conn, device)
        if message is None or message[0] == "stop":
            if conn is not None and message is not None:
                conn.send(("ok", {"stopped": True}))
            return
        if message[0] == "heartbeat":
            continue
        reply = _run(trainer, _for_rank(message, rank))
        if conn is not None:
            conn.send(reply)
        if reply[0] == "error":  # the ranks may be out of step now: end them all (the launcher sees it)
            raise RuntimeError(f"rank {rank}: {reply[2]}")
