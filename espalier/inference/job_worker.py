"""The trainer worker process of a GRPO job: owns the `GRPOTrainer`, obeys commands on a pipe.

Started with a `WorkerSpec`, it answers `Ready` or a `WorkerError`, then each command of
`worker_protocol.py` with its reply: `StepCommand` -> `StepDone`, `ResumeCommand` -> `Resumed`
(a restarted worker loads the saved state), `CheckpointCommand` -> `CheckpointSaved`,
`StopCommand` -> `Stopped`, or a `WorkerError` whose kind is "config" for a bad train_kwargs
(-> HTTP 400) and "trainer" otherwise. The process exits on a stop or when the pipe closes.

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
3. While the server sends nothing, rank 0 broadcasts a `Heartbeat` every `HEARTBEAT_S`, so the
   other ranks' wait never reaches the process group's collective timeout (rollouts take long).
4. With `spec.record_dir`, the trainer is built with a `SequenceRecorder` (training/record.py):
   rank r > 0 records its share of the sequences to `step-N.rank<r>.jsonl`.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from espalier.inference.worker_protocol import (
    CheckpointCommand,
    CheckpointSaved,
    Command,
    Heartbeat,
    Ready,
    Reply,
    ResumeCommand,
    Resumed,
    StepCommand,
    StepDone,
    StopCommand,
    Stopped,
    WorkerError,
    WorkerSpec,
    receive_command,
    send,
)

if TYPE_CHECKING:
    from espalier.training.distributed import Processes
    from espalier.training.record import OnFed, SequenceRecorder

DEFAULT_FACTORY = "espalier.inference.job_worker:build_trainer"
HEARTBEAT_S = 60.0


def build_trainer(model_path: Path, train_kwargs: dict[str, Any], device: str, processes: Processes | None = None,
                  on_fed: OnFed | None = None):
    """The real trainer, per the DESIGN.md contract; `processes` is given on several ranks, `on_fed` when the job
    records what is trained. A stand-in factory takes the same arguments."""
    from espalier.config import TrainConfig
    from espalier.training import GRPOTrainer

    config = TrainConfig.from_kwargs(train_kwargs)
    return GRPOTrainer(model_path, config, device=device, processes=processes, on_fed=on_fed)


def _load(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _trainer_error(e: Exception) -> WorkerError:
    return WorkerError("trainer", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")


def _recorder(spec: WorkerSpec, rank: int) -> SequenceRecorder | None:
    from espalier.training.record import SequenceRecorder

    return None if spec.record_dir is None else SequenceRecorder(spec.record_dir, rank)


def _start(spec: WorkerSpec, device: str, processes: Processes | None,
           recorder: SequenceRecorder | None) -> tuple[Any, WorkerError | None]:
    """(trainer, None), or (None, the error to reply with)."""
    try:
        factory = _load(spec.factory)
        return factory(spec.model_path, spec.train_kwargs, device, processes=processes, on_fed=recorder), None
    except ValueError as e:
        return None, WorkerError("config", str(e))
    except Exception as e:
        return None, _trainer_error(e)


def _step(trainer, recorder: SequenceRecorder | None, command: StepCommand) -> StepDone:
    if recorder is not None:
        recorder.start_step(command.step)
    metrics = trainer.train_step(list(command.groups))
    adapter = trainer.export_adapter(command.export_dir)
    trainer.save_checkpoint(command.state_dir)  # what a restarted worker resumes from (job.py)
    return StepDone(tuple(metrics), Path(adapter), int(trainer.optimizer_steps))


def _checkpoint(trainer, directory: Path) -> CheckpointSaved:
    trainer.save_checkpoint(directory)
    adapter = directory / "adapter"  # GRPOTrainer.save_checkpoint writes the adapter there (after a barrier)
    if not (adapter / "adapter_config.json").exists():
        adapter = trainer.export_adapter(adapter)
    return CheckpointSaved(directory, Path(adapter))


def _handle(trainer, recorder: SequenceRecorder | None, command: Command) -> Reply:
    if isinstance(command, StepCommand):
        return _step(trainer, recorder, command)
    if isinstance(command, ResumeCommand):
        trainer.load_checkpoint(command.state_dir)
        return Resumed(int(trainer.optimizer_steps))
    if isinstance(command, CheckpointCommand):
        return _checkpoint(trainer, command.directory)
    raise TypeError(f"the worker cannot run {command!r}")


def _run(trainer, recorder: SequenceRecorder | None, command: Command) -> Reply:
    try:
        return _handle(trainer, recorder, command)
    except Exception as e:
        return _trainer_error(e)


def _receive(conn: Connection) -> Command | None:
    """The next command; None when the server closed the pipe."""
    try:
        return receive_command(conn)
    except EOFError:
        return None


def worker_main(conn: Connection, spec: WorkerSpec) -> None:
    _exit_with_parent()  # a killed server must not leave its trainer running (and writing adapters)
    if spec.processes > 1:
        _launch_ranks(conn, spec)
        return
    recorder = _recorder(spec, 0)
    trainer, error = _start(spec, spec.device, None, recorder)
    send(conn, error or Ready())
    while error is None:
        command = _receive(conn)
        if command is None or isinstance(command, StopCommand):
            if command is not None:
                send(conn, Stopped())
            return
        send(conn, _run(trainer, recorder, command))


# ---- several ranks -----------------------------------------------------------------------


def _launch_ranks(conn: Connection, spec: WorkerSpec) -> None:
    """Start the ranks and wait; a failed rank raises here, so this process exits nonzero."""
    import multiprocessing

    from espalier.training.distributed import launch

    multiprocessing.current_process().daemon = False  # the job starts this process as a daemon; ranks are children
    if spec.visible_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = spec.visible_devices  # "" = CPU ranks
    launch(rank_main, spec.processes, args=(conn, spec))


def _exit_with_parent() -> None:
    """End this process if its parent (the server, or the ranks' launcher) dies, even while the main thread
    is busy in a step or blocked in a collective."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="espalier-parent-watch", daemon=True).start()


def rank_main(conn: Connection | None, spec: WorkerSpec) -> None:
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
    recorder = _recorder(spec, processes.rank)
    trainer, error = _start(spec, device, processes, recorder)
    errors: list[WorkerError | None] = [None] * processes.world_size
    dist.all_gather_object(errors, error)
    error = next((e for e in errors if e is not None), None)
    if conn is not None:
        send(conn, error or Ready())
    if error is None:
        _rank_loop(conn, trainer, recorder, processes.rank, torch.device(device))


def _next_command(conn: Connection | None, device) -> Command | Heartbeat | None:
    """Rank 0 reads the pipe (a heartbeat while it is quiet) and every rank gets the same command."""
    import torch.distributed as dist

    command: Command | Heartbeat | None = Heartbeat()
    if conn is not None and conn.poll(HEARTBEAT_S):
        command = _receive(conn)
    box = [command]
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


def _rank_loop(conn: Connection | None, trainer, recorder: SequenceRecorder | None, rank: int, device) -> None:
    while True:
        command = _next_command(conn, device)
        if command is None or isinstance(command, StopCommand):
            if conn is not None and command is not None:
                send(conn, Stopped())
            return
        if isinstance(command, Heartbeat):
            continue
        reply = _run(trainer, recorder, command)
        if conn is not None:
            send(conn, reply)
        if isinstance(reply, WorkerError):  # the ranks may be out of step now: end them all (the launcher sees it)
            raise RuntimeError(f"rank {rank}: {reply.message}")
