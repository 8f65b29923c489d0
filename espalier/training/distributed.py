"""Several training processes: a tiny process-group object for the trainer and a launcher.

The trainer sees a `Processes` object (rank, world size, sum over processes); one process
uses `SingleProcess`, a null object, so the training loop has no `if distributed` branches.
`launch(fn, num_processes)` starts workers with accelerate's environment conventions
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and each worker calls
`init_processes()`, which lets `accelerate.PartialState` set up the process group (gloo on
CPU, nccl on CUDA), then builds `GRPOTrainer(path, config, worker_device(), processes)`.
Each process trains on its slice of every optimizer batch (rank::world_size) and saves
checkpoints from rank 0.

Departures from DDP / Arbor:
1. Gradients of the trainable (LoRA) parameters are summed with one flat all-reduce per
   optimizer step, after the last micro-batch, instead of DDP's bucketed all-reduce during
   backward: LoRA gradients are a few MB, and the losses are normalised by counts of the
   whole optimizer batch (losses.py), so a sum, not a mean, is the exact gradient.
2. No full-weight broadcast ever (Arbor merges LoRA and broadcasts the whole model over NCCL
   on a fixed port): the adapter is exported to a directory that the engine loads.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class Processes(Protocol):
    rank: int
    world_size: int

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def barrier(self) -> None: ...


class SingleProcess:
    rank = 0
    world_size = 1

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        pass


class TorchProcesses:
    """The default torch.distributed process group (set up by accelerate)."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum in place over processes; NCCL needs the tensor on this process's GPU, so it travels there."""
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else tensor.device
        moved = tensor.to(device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        return tensor.copy_(moved)

    def barrier(self) -> None:
        dist.barrier()


def init_processes() -> Processes:
    """In a worker: initialise the process group through accelerate; one process gets the null object."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SingleProcess()
    from accelerate import PartialState

    PartialState(backend="nccl" if torch.cuda.is_available() else "gloo")
    return TorchProcesses()


def worker_device() -> str:
    """The device a worker trains on: its LOCAL_RANK's GPU, else the CPU."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(local_rank: int, fn: Callable[..., Any], world_size: int, port: int, args: tuple) -> None:
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        fn(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn: Callable[..., Any], num_processes: int, args: tuple = ()) -> None:
    """Run `fn(*args)` in `num_processes` fresh processes on this node and wait for all of them.

    `fn` must be importable (a module-level function); it calls `init_processes()` to join the
    group. A failing worker raises here (torch.multiprocessing reports which rank failed).
    """
    mp.start_processes(_worker, args=(fn, num_processes, free_port(), args), nprocs=num_processes, start_method="spawn")
