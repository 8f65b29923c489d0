"""The trainer worker process of a GRPO job: owns the `GRPOTrainer`, obeys commands on a pipe.

Started with a `WorkerSpec`, it answers `Ready` or a `WorkerError`, then each command of
`protocol.py` with its reply: `StepCommand` -> `StepDone`, `ResumeCommand` -> `Resumed`
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
3. While the server sends nothing, rank 0 broadcasts a `Heartbeat` every `heartbeat_s(timeout)`
   (`HEARTBEAT_S`, or a quarter of the shortest collective timeout of the ranks), so the other
   ranks' wait never reaches the process group's collective timeout (rollouts take long).
4. With `spec.record_dir`, the trainer is built with a `SequenceRecorder` (training/record.py):
   rank r > 0 records its share of the sequences to `step-N.rank<r>.jsonl` (on its node's disk).
5. Several nodes (`spec.nodes`, a `TrainNodes`): this process hosts torchrun's c10d rendezvous
   and starts the head's ranks through torchrun's agent (`distributed.launch_nodes`); the other
   nodes run `torchrun ... -m espalier.training.join`, whose ranks get the `WorkerSpec` from
   rank 0 and run the same loop. Rank 0 is the head's first rank (the one with the pipe), so
   adapters and checkpoints are written on the server's machine. Before the trainer is built the
   ranks compare their package versions and check the model path; a node that disagrees is a
   "config" error that names the fix. Every collective has a timeout (`TrainNodes.timeout_s`).
   Rank 0 writes the trainer state on the head's disk, and a `ResumeCommand` makes every rank load
   it: resuming on several nodes needs a run directory shared by every node (the same path on
   each); a rank that cannot see the state is a "config" error that says so.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from espalier.training.protocol import (
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
    from espalier.config import TrainConfig
    from espalier.training.distributed import Processes, TorchProcesses
    from espalier.training.record import OnFed, SequenceRecorder

HEARTBEAT_S = 60.0  # the most time between two broadcasts from rank 0 (heartbeat_s)


def heartbeat_s(timeout_s: float) -> float:
    """Seconds between rank 0's heartbeats: well within `timeout_s`, so an idle rank's wait never times out."""
    return min(HEARTBEAT_S, timeout_s / 4)


class GRPOTrainerFactory:
    """The real trainer (`protocol.TrainerFactory`); `processes` is given on several ranks, `on_fed` when the job
    records what is trained."""

    def __call__(self, model_path: Path, config: TrainConfig, device: str, processes: Processes | None = None,
                 on_fed: OnFed | None = None):
        from espalier.training import GRPOTrainer

        return GRPOTrainer(model_path, config, device=device, processes=processes, on_fed=on_fed)


DEFAULT_FACTORY = GRPOTrainerFactory()


def _trainer_error(e: Exception) -> WorkerError:
    return WorkerError("trainer", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")


def recorder_for(spec: WorkerSpec, rank: int) -> SequenceRecorder | None:
    from espalier.training.record import SequenceRecorder

    return None if spec.record_dir is None else SequenceRecorder(spec.record_dir, rank)


def build_trainer(spec: WorkerSpec, device: str, processes: Processes | None,
           recorder: SequenceRecorder | None) -> tuple[Any, WorkerError | None]:
    """(trainer, None), or (None, the error to reply with)."""
    try:
        return spec.factory(spec.model_path, spec.config, device, processes=processes, on_fed=recorder), None
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
    trainer.save_checkpoint(directory)  # the adapter included, in directory/adapter (from rank 0, then a barrier)
    return CheckpointSaved(directory, directory / "adapter")


def _handle(trainer, recorder: SequenceRecorder | None, command: Command) -> Reply:
    if isinstance(command, StepCommand):
        return _step(trainer, recorder, command)
    if isinstance(command, ResumeCommand):
        trainer.load_checkpoint(command.state_dir)
        return Resumed(int(trainer.optimizer_steps))
    if isinstance(command, CheckpointCommand):
        return _checkpoint(trainer, command.directory)
    raise TypeError(f"the worker cannot run {command!r}")


def run_command(trainer, recorder: SequenceRecorder | None, command: Command) -> Reply:
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
    if spec.processes > 1 or spec.nodes is not None:
        _launch_ranks(conn, spec)
        return
    recorder = recorder_for(spec, 0)
    trainer, error = build_trainer(spec, spec.device, None, recorder)
    send(conn, error or Ready())
    while error is None:
        command = _receive(conn)
        if command is None or isinstance(command, StopCommand):
            if command is not None:
                send(conn, Stopped())
            return
        send(conn, run_command(trainer, recorder, command))


# ---- several ranks -----------------------------------------------------------------------


def _launch_ranks(conn: Connection, spec: WorkerSpec) -> None:
    """Start this node's ranks (and with `spec.nodes`, wait for the other nodes) and wait; a failed rank raises
    here, so this process exits nonzero."""
    import multiprocessing

    from espalier.training.distributed import launch, launch_nodes

    multiprocessing.current_process().daemon = False  # the job starts this process as a daemon; ranks are children
    visible = _visible_devices(spec)
    if visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible  # "" = CPU ranks
    if spec.nodes is None:
        launch(rank_main, spec.processes, args=(conn, spec))
    else:
        launch_nodes(rank_main, spec.nodes, spec.processes, args=(conn, spec))


def _visible_devices(spec: WorkerSpec) -> str | None:
    """The head's ranks' CUDA_VISIBLE_DEVICES; one rank per node on "cpu" or "cuda:k" sees that device only."""
    if spec.visible_devices is not None or spec.nodes is None:
        return spec.visible_devices
    return "" if spec.device == "cpu" else spec.device.partition(":")[2]


def _exit_with_parent() -> None:
    """End this process if its parent (the server, or the ranks' launcher) dies, even while the main thread
    is busy in a step or blocked in a collective."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="espalier-parent-watch", daemon=True).start()


def rank_main(conn: Connection | None, spec: WorkerSpec | None, timeout_s: float | None = None) -> WorkerError | None:
    """One rank: join the group, get the spec from rank 0 (a rank of a joining node has none), build the trainer,
    agree on the start with the other ranks, then obey rank 0. Returns the start error the ranks agreed on."""
    import torch

    from espalier.training.distributed import DEFAULT_TIMEOUT_S, TorchProcesses, init_processes, worker_device

    _exit_with_parent()
    leads = conn is not None and os.environ.get("LOCAL_RANK", "0") == "0"  # the head's first rank talks to the job
    if timeout_s is None:
        timeout_s = spec.nodes.timeout_s if spec is not None and spec.nodes is not None else DEFAULT_TIMEOUT_S
    processes = init_processes(timeout_s, leads=leads)  # on this rank's device (the current CUDA device)
    assert isinstance(processes, TorchProcesses), "rank_main runs in a group of two or more ranks"
    device = worker_device()
    if conn is not None and not leads:
        conn.close()
        conn = None
    joined = spec is None
    spec = processes.broadcast_object(spec, torch.device(device))
    heartbeat = heartbeat_s(min(processes.gather_objects(timeout_s)))  # each rank waits by its own timeout
    recorder = recorder_for(spec, processes.rank)
    trainer, error = None, _node_error(spec, processes, joined)
    if error is None:
        trainer, error = build_trainer(spec, device, processes, recorder)
    error = next((e for e in processes.gather_objects(error) if e is not None), None)
    if conn is not None:
        send(conn, error or Ready())
    if error is None:
        _rank_loop(conn, trainer, recorder, processes, torch.device(device), heartbeat)
    return error


def _software() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "absent"

    return ", ".join(f"{name} {installed(name)}" for name in ("torch", "transformers", "peft", "espalier"))


def _node_error(spec: WorkerSpec, processes: TorchProcesses, joined: bool) -> WorkerError | None:
    """A node whose setup disagrees with the head's: other package versions, or no model where the head has it."""
    software = processes.gather_objects(_software())
    if len(set(software)) > 1:
        ranks = "; ".join(f"rank {r}: {s}" for r, s in enumerate(software))
        return WorkerError("config", f"the training ranks run different software ({ranks}); install the same "
                                     "versions on every training node")
    if joined and not Path(spec.model_path).exists():
        return WorkerError("config", f"{socket.gethostname()} (rank {processes.rank}) has no model at "
                                     f"{spec.model_path}; put the model at the same path on every training node")
    return None


def _next_command(conn: Connection | None, processes: TorchProcesses, device,
                  heartbeat: float) -> Command | Heartbeat | None:
    """Rank 0 reads the pipe (a heartbeat when it is quiet for `heartbeat` s) and every rank gets the same command;
    a rank that lost the others (one died, hung past the timeout, or its node went away) raises, rank 0 after
    replying."""
    command: Command | Heartbeat | None = Heartbeat()
    if conn is not None and conn.poll(heartbeat):
        command = _receive(conn)
    try:
        return processes.broadcast_object(command, device)
    except Exception as e:  # gloo and nccl raise RuntimeError subclasses; any failure here ends the ranks
        lost = (f"rank {processes.rank} lost the other training ranks ({type(e).__name__}: {e}); a rank died, hung "
                "past the collective timeout, or its node is unreachable")
        if conn is not None and isinstance(command, (StepCommand, CheckpointCommand, ResumeCommand)):
            with contextlib.suppress(OSError):
                send(conn, WorkerError("trainer", lost))  # the job waits for this command's reply
        raise RuntimeError(lost) from e


def _missing_state(command: ResumeCommand, processes: TorchProcesses) -> WorkerError | None:
    """Rank 0 saved the state on its own disk: a rank on another node sees it only through a shared directory."""
    seen = processes.gather_objects((socket.gethostname(), Path(command.state_dir).is_dir()))
    missing = [f"{host} (rank {rank})" for rank, (host, found) in enumerate(seen) if not found]
    if not missing:
        return None
    return WorkerError("config", f"{', '.join(missing)} cannot find the trainer state at {command.state_dir}: "
                                 "resuming on several nodes needs a run directory shared by every training node, "
                                 "at the same path on each (e.g. a network file system given to espalier serve "
                                 "--run-dir)")


def _rank_loop(conn: Connection | None, trainer, recorder: SequenceRecorder | None, processes: TorchProcesses,
               device, heartbeat: float) -> None:
    while True:
        command = _next_command(conn, processes, device, heartbeat)
        if command is None or isinstance(command, StopCommand):
            if conn is not None and command is not None:
                send(conn, Stopped())
            return
        if isinstance(command, Heartbeat):
            continue
        missing = _missing_state(command, processes) if isinstance(command, ResumeCommand) else None
        reply = missing or run_command(trainer, recorder, command)
        if conn is not None:
            send(conn, reply)
        if isinstance(reply, WorkerError):  # the ranks may be out of step now: end them all (the launcher sees it)
            raise RuntimeError(f"rank {processes.rank}: {reply.message}")
