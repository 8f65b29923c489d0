"""Several training processes: a tiny process-group object for the trainer and a launcher.

The trainer sees a `Processes` object (rank, world size, sum over processes); one process
uses `SingleProcess`, a null object, so the training loop has no `if distributed` branches.
`launch(fn, num_processes)` starts workers on this node with torchrun's environment conventions
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); `launch_nodes(fn, nodes, n)` starts
this node's n workers as one node of a `TrainNodes` group: torchrun's c10d rendezvous (hosted
here, at `nodes.endpoint`), which the other nodes join with `torchrun ... -m espalier.training.join`.
Each worker calls `init_processes()` (the process group: gloo on CPU, nccl on CUDA, every
collective under a timeout), then builds `GRPOTrainer(path, config, worker_device(), processes)`.
Each process trains on its slice of every optimizer batch (rank::world_size) and saves
checkpoints from rank 0.

The commands (docs/DESIGN.md, "Several processes, several nodes"):
    one node, N CPU ranks: espalier serve --train-processes N
    two nodes, the head (where the server runs, at address HEAD):
        espalier serve --train-nodes 2 --train-rdzv-endpoint HEAD:29500 [--train-processes N]
    two nodes, the other one (the model at the same path as on the head):
        torchrun --nnodes 2 --nproc-per-node N --rdzv-backend c10d --rdzv-endpoint HEAD:29500
                 --rdzv-id espalier -m espalier.training.join

Departures from DDP / Arbor:
1. Gradients of the trainable (LoRA) parameters are summed with one flat all-reduce per
   optimizer step, after the last micro-batch, instead of DDP's bucketed all-reduce during
   backward: LoRA gradients are a few MB, and the losses are normalised by counts of the
   whole optimizer batch (losses.py), so a sum, not a mean, is the exact gradient.
2. Rank 0 is the process that leads (`init_processes(leads=...)`: the head's first rank, which
   talks to the server), not torch's global rank 0: the c10d rendezvous numbers nodes by host
   name and pid and ignores `--node-rank`. `TorchProcesses` renumbers the ranks from the leader,
   so the slices, the sums and the rank-0 writes (adapters, checkpoints) follow the leader.
3. No full-weight broadcast ever (Arbor merges LoRA and broadcasts the whole model over NCCL
   on a fixed port): the adapter is exported to a directory that the engine loads.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from espalier.ports import free_port


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


DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for a collective; also the join module's --timeout


class TorchProcesses:
    """The default torch.distributed process group, numbered from `leader` (the global rank that is rank 0)."""

    def __init__(self, leader: int = 0) -> None:
        self.leader = leader
        self.world_size = dist.get_world_size()
        self.rank = (dist.get_rank() - leader) % self.world_size

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum in place over processes; NCCL needs the tensor on this process's GPU, so it travels there."""
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else tensor.device
        moved = tensor.to(device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        return tensor.copy_(moved)

    def barrier(self) -> None:
        dist.barrier()

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in this group's rank order (rank 0 = the leader first)."""
        objects: list[Any] = [None] * self.world_size
        dist.all_gather_object(objects, obj)
        return objects[self.leader:] + objects[: self.leader]

    def broadcast_object(self, obj: Any, device: torch.device) -> Any:
        """Rank 0's `obj` on every rank (`device`: where NCCL stages the bytes; the CPU for gloo)."""
        box = [obj]
        dist.broadcast_object_list(box, src=self.leader, device=device)
        return box[0]


def init_processes(timeout_s: float = DEFAULT_TIMEOUT_S, leads: bool | None = None) -> Processes:
    """In a worker: join the process group (from the environment torchrun or `launch` set) on this rank's device
    (`worker_device()`, made the current CUDA device); one process gets the null object. `leads`: whether this
    process is to be rank 0, exactly one process saying so (None: global rank 0 leads). A collective that waits
    longer than `timeout_s` raises instead of hanging."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SingleProcess()
    if torch.cuda.is_available():  # this rank's GPU before any collective, else every NCCL rank would use cuda:0
        device = torch.device(worker_device())
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timedelta(seconds=timeout_s), device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    if leads is None:
        return TorchProcesses()
    claims: list[bool] = [False] * dist.get_world_size()
    dist.all_gather_object(claims, leads)
    if claims.count(True) != 1:
        raise RuntimeError(f"{claims.count(True)} training ranks claim to lead, not 1: start exactly one server "
                           "(the head) per rendezvous endpoint; the other nodes run espalier.training.join")
    return TorchProcesses(claims.index(True))


def worker_device() -> str:
    """The device a worker trains on: its LOCAL_RANK's GPU, else the CPU."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


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


@dataclass(frozen=True)
class TrainNodes:
    """Training ranks on several machines: this node hosts torchrun's c10d rendezvous, the others join it."""

    endpoint: str  # HOST:PORT on this node that the other nodes reach (their torchrun --rdzv-endpoint)
    count: int  # nodes, this one included (their torchrun --nnodes)
    join_timeout_s: float = 600.0  # how long this node waits for the others to join
    timeout_s: float = DEFAULT_TIMEOUT_S  # how long any collective waits (a rank that hangs)
    run_id: str = "espalier"  # their torchrun --rdzv-id
    log_dir: Path | None = None  # where torchrun's agent writes its per-run logs (None: a new /tmp/torchelastic_*)

    def __post_init__(self) -> None:
        host, _, port = self.endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"rendezvous endpoint {self.endpoint!r} is not HOST:PORT; give an address of this "
                             "machine that the other nodes reach, e.g. --train-rdzv-endpoint 10.0.0.1:29500")
        if self.count < 2:
            raise ValueError(f"{self.count} training node(s): a rendezvous needs --train-nodes 2 or more; "
                             "for one node leave out --train-nodes and --train-rdzv-endpoint")
        if self.join_timeout_s <= 0 or self.timeout_s <= 0:
            raise ValueError("the rendezvous and collective timeouts must be positive seconds")

    @property
    def host(self) -> str:
        return self.endpoint.rpartition(":")[0].strip("[]")


def launch_nodes(fn: Callable[..., Any], nodes: TrainNodes, nproc_per_node: int, args: tuple = ()) -> None:
    """Run `fn(*args)` in `nproc_per_node` processes on this node once `nodes.count` nodes met at the rendezvous
    this node hosts (torchrun's agent: `torch.distributed.launcher.api`), and wait for all of them.

    No restarts: a failed or killed rank anywhere ends this node's ranks and raises here (`ChildFailedError`);
    nodes that do not all join within `nodes.join_timeout_s` raise too."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=nodes.count, max_nodes=nodes.count, nproc_per_node=nproc_per_node, run_id=nodes.run_id,
        rdzv_backend="c10d", rdzv_endpoint=nodes.endpoint, max_restarts=0, start_method="spawn",
        rdzv_configs={"is_host": True, "join_timeout": nodes.join_timeout_s},
        local_addr=nodes.host,  # the address the others reach this node by, not whatever the FQDN resolves to
        logs_specs=DefaultLogsSpecs(log_dir=None if nodes.log_dir is None else str(nodes.log_dir)),
    )
    elastic_launch(config, fn)(*args)
