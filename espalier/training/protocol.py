"""The messages between a GRPO job (server process) and its trainer worker process, and how they travel.

    job.GRPOJob ──Command──▶ worker.py (rank 0) ──Command or Heartbeat──▶ ranks 1..N-1 (broadcast)
                ◀──Reply───

The worker is started with a `WorkerSpec`; it answers `Ready` (or a `WorkerError`), then each
command with its reply: `StepCommand` -> `StepDone`, `ResumeCommand` -> `Resumed`,
`CheckpointCommand` -> `CheckpointSaved`, `StopCommand` -> `Stopped`; any of them may instead be
answered by a `WorkerError`. Messages are pickled frozen dataclasses; `send`, `receive_command`
and `receive_reply` are the only code that puts them on or takes them off the pipe, and a
receiver refuses anything but the messages it expects.

Departures from Arbor:
1. Typed messages over a multiprocessing pipe, checked on arrival, instead of dicts of a
   loosely agreed shape over ZMQ sockets.
"""

from __future__ import annotations

from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from espalier.pipes import receive_typed, send_typed
from espalier.types import Group, StepMetrics

if TYPE_CHECKING:
    from espalier.config import TrainConfig
    from espalier.training.distributed import TrainNodes


class TrainerFactory(Protocol):
    """Builds the worker's trainer (`worker.GRPOTrainerFactory`, or a stand-in called the same way).

    It crosses the worker's spawn pickled by reference: a module-level class or an instance of one."""

    def __call__(self, model_path: Path, config: TrainConfig, device: str, processes: Any = None,
                 on_fed: Any = None) -> Any:
        """The trainer: `train_step(groups)`, `save_checkpoint`, ... per DESIGN.md's contract; a ValueError is a
        config the trainer refuses (HTTP 400)."""


@dataclass(frozen=True)
class WorkerSpec:
    """What a trainer worker process is started with."""

    factory: TrainerFactory  # builds the trainer in the worker (worker.DEFAULT_FACTORY, or a stand-in)
    model_path: Path
    config: TrainConfig  # validated once, where the job's request arrived
    device: str = "cpu"
    processes: int = 1  # > 1: that many ranks (worker.py)
    visible_devices: str | None = None  # CUDA_VISIBLE_DEVICES of the ranks ("" = CPU ranks)
    record_dir: Path | None = None  # every fed sequence is appended under it (training/record.py); None: not recorded
    nodes: TrainNodes | None = None  # several nodes: `processes` ranks on each (worker.py); None: this one only


# ---- commands: job -> worker -> ranks -------------------------------------------------------


@dataclass(frozen=True)
class StepCommand:
    """Train on every sample of `groups`, export the adapter to `export_dir`, save the state to `state_dir`."""

    step: int  # the job's step number (1-based): names the file the fed sequences are recorded to
    groups: tuple[Group, ...]
    export_dir: Path
    state_dir: Path  # what a restarted worker resumes from (job.py)


@dataclass(frozen=True)
class CheckpointCommand:
    """Save the trainer state (adapter included) to `directory`."""

    directory: Path


@dataclass(frozen=True)
class ResumeCommand:
    """Load the trainer state saved in `state_dir` (a restarted worker, or a resumed job)."""

    state_dir: Path


@dataclass(frozen=True)
class StopCommand:
    """Stop the worker (every rank); it answers `Stopped` and exits."""


@dataclass(frozen=True)
class Heartbeat:
    """Rank 0 -> the other ranks while the job sends nothing, so their wait never times out (worker.py)."""


Command = StepCommand | CheckpointCommand | ResumeCommand | StopCommand


# ---- replies: worker (rank 0) -> job --------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """The trainer is built (on every rank)."""


@dataclass(frozen=True)
class StepDone:
    metrics: tuple[StepMetrics, ...]  # one per optimizer step
    adapter: Path
    optimizer_steps: int


@dataclass(frozen=True)
class Resumed:
    optimizer_steps: int


@dataclass(frozen=True)
class CheckpointSaved:
    checkpoint: Path
    adapter: Path


@dataclass(frozen=True)
class Stopped:
    """The worker is about to exit."""


@dataclass(frozen=True)
class WorkerError:
    """A command (or the trainer's start) failed: "config" is a config the trainer refused (-> HTTP 400), "trainer" anything
    else (-> 500, with the traceback in `message`)."""

    kind: Literal["config", "trainer"]
    message: str


Reply = Ready | StepDone | Resumed | CheckpointSaved | Stopped | WorkerError
COMMANDS = (StepCommand, CheckpointCommand, ResumeCommand, StopCommand)
REPLIES = (Ready, StepDone, Resumed, CheckpointSaved, Stopped, WorkerError)


def send(conn: Connection, message: Command | Reply) -> None:
    """Put one message on the pipe (pickled); raises OSError when the other end is gone."""
    send_typed(conn, message, COMMANDS + REPLIES)


def receive_command(conn: Connection) -> Command:
    """The worker's next command; raises EOFError when the job closed the pipe."""
    return receive_typed(conn, COMMANDS)


def receive_reply(conn: Connection) -> Reply:
    """The worker's next reply; raises EOFError (or OSError) when the worker is gone."""
    return receive_typed(conn, REPLIES)
