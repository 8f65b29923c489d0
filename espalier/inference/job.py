"""The GRPO job behind `/v1/fine_tuning/grpo/*`: a trainer worker process plus adapter publishing.

A step takes the posted batch as `espalier.types.Group`s (arbor_wire.py), has the trainer run
`GRPOTrainer.train_step` on all of them, exports the new adapter and loads it into the engine
as the current policy, timing the swap. The trainer is a `training.handle.TrainerHandle`: a
worker process (`TrainerProcess`, the default) or this process (`InProcessTrainer`, with
`--train-in-process`); the job speaks to it in the typed messages of `training/protocol.py` (a
`StepCommand` is answered by `StepDone`, ...). Every wait on a worker has a timeout, and a dead
worker turns the job's status to "failed" with the reason instead of hanging.

Departures from Arbor:
1. `step` trains on every group it is given, synchronously, and returns when the new policy
   is being served; Arbor queues one group per optimizer step and trains in the background.
2. Batch items keep the ids that were sampled, or are tokenised with the server's own chat
   template (the one that sampled), never re-rendered by another adapter (arbor_wire.py).
3. `pending_batch_ids` advertises `batches_per_step` ids at a time (default 1, as Arbor's
   clients expect one group per id); Espalier's own client sends groups without ids.
4. A trainer error or a timeout is reported in `status` and as HTTP 500/409 with the message;
   Arbor waits forever. A worker that dies is restarted from the state saved after the last
   step (`JobStore.state_dir`, written atomically by every step): between commands transparently,
   during one with a retryable 503 naming the step it resumed from; after `MAX_RESTARTS` the
   job fails.
5. `num_training_gpus` is honoured (`training_placement`): 0 trains on the CPU, 1 on the
   planned CUDA device, N > 1 on N ranks of the planned devices (training/worker.py); a count the
   machine cannot give is a 400 naming the fix. A server started with `--train-processes N`
   trains on N CPU ranks instead (gloo; for CPU clusters and tests).
6. Checkpoints live under `run_dir/checkpoints/<job_id>/<name>` and are served as
   `<model>@<job_id>/<name>`: a second job's `step-N` never replaces the first's, so a program
   compiled earlier keeps its adapter. `status()["checkpoints"]` has Arbor's records
   (`{name: {checkpoint_name, checkpoint_dir, global_step, metadata, timestamp, model}}`).
7. `supersede` ends a job that a new `initialize` replaces (grpo_routes.py says why).
8. What stays on disk is bounded (`job_store.py`): the latest exported adapter, the trainer
   state of the last two steps, and the named checkpoints.
9. `resume=(job_id, step)` goes on with an earlier job (same id, same checkpoint names) from
   the trainer state saved after that step; a run resumed by `compile(..., resume=True)`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from espalier.inference.arbor_wire import PendingBatches
from espalier.inference.job_store import JobStore
from espalier.inference.serving import ServedModel
from espalier.training.handle import (
    InProcessTrainer,
    TrainerGone,
    TrainerHandle,
    TrainerProcess,
    TrainerRefused,
    TrainerTimeout,
)
from espalier.training.protocol import (
    CheckpointCommand,
    CheckpointSaved,
    Command,
    ResumeCommand,
    Resumed,
    StepCommand,
    StepDone,
    TrainerFactory,
    WorkerSpec,
)
from espalier.training.worker import DEFAULT_FACTORY
from espalier.types import Group, JobStatus

if TYPE_CHECKING:
    from espalier.config import TrainConfig
    from espalier.training.distributed import TrainNodes

log = logging.getLogger(__name__)


MAX_RESTARTS = 3  # trainer worker restarts per job
STOP_GRACE_S = 30.0  # how long ending a job waits for the command in flight before it kills the trainer
R = TypeVar("R")


class JobError(RuntimeError):
    """The job cannot do what was asked; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


@dataclass
class JobOptions:
    model_path: Path
    run_dir: Path
    config: TrainConfig  # validated where the request arrived (arbor_wire.py)
    device: str = "cpu"
    batches_per_step: int = 1
    start_timeout: float = 900.0
    step_timeout: float = 3600.0
    factory: TrainerFactory = DEFAULT_FACTORY  # builds the trainer in the worker
    record_trained: bool = False  # the trainer appends every sequence it feeds to run_dir/trained/step-N.jsonl
    resume: tuple[str, int] | None = None  # (job_id, step): go on with that job from the state after that step
    processes: int = 1  # > 1: that many ranks (training/worker.py)
    visible_devices: str | None = None  # CUDA_VISIBLE_DEVICES of the ranks ("" = CPU ranks)
    nodes: TrainNodes | None = None  # several nodes, `processes` ranks on this one (training/worker.py)
    in_process: bool = False  # the trainer runs in the server's process (`--train-in-process`), not a worker


def training_placement(config: TrainConfig, train_processes: int = 0,
                       available: int | None = None) -> tuple[str, int, str | None]:
    """(device, processes, CUDA_VISIBLE_DEVICES of the ranks) for a job; impossible counts are a 400."""
    from espalier.config import plan_devices

    try:
        if train_processes > 0 and config.num_training_gpus > 0:
            raise ValueError(
                f"train_kwargs['num_training_gpus'] = {config.num_training_gpus} but this server trains on "
                f"{train_processes} CPU process(es) (--train-processes); set it to 0 or restart without --train-processes"
            )
        plan = plan_devices(config.num_training_gpus, config.num_inference_gpus, available)
    except ValueError as e:
        raise JobError(str(e), 400) from e
    if train_processes > 0:
        return "cpu", train_processes, "" if train_processes > 1 else None
    if len(plan.training) <= 1:
        return (f"cuda:{plan.training[0]}" if plan.training else "cpu"), 1, None
    return "cuda", len(plan.training), ",".join(str(d) for d in plan.training)


@dataclass
class JobState:
    job_id: str
    status: str = "initializing"  # running | failed | cancelled | terminated
    error: str | None = None
    steps: int = 0
    optimizer_steps: int = 0
    checkpoints: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> Arbor's checkpoint record
    last_checkpoint: str | None = None
    last_swap_ms: float | None = None
    last_metrics: list[dict[str, Any]] = field(default_factory=list)


class GRPOJob:
    def __init__(self, served: ServedModel, options: JobOptions):
        self.served = served
        self.options = options
        job_id, resume_step = options.resume or (f"grpo-{uuid.uuid4().hex[:12]}", 0)
        self.state = JobState(job_id=job_id)
        self.store = JobStore(options.run_dir, job_id)
        if resume_step and resume_step not in self.store.saved_steps():
            raise JobError(f"cannot resume job {job_id} at step {resume_step}: no saved state under "
                           f"{self.store.state_dir(resume_step)} (saved steps: {self.store.saved_steps()})", 409)
        self.batches = PendingBatches(options.batches_per_step)  # Arbor's pending_batch_ids
        self._lock = threading.Lock()  # one command at a time on the pipe
        self.restarts = 0
        self._start_worker()
        if options.resume:
            self._resume(resume_step)
        self.state.status = "running"

    def _resume(self, step: int) -> None:
        """Go on from the state saved after `step`, and serve the job's checkpoints again."""
        self.state.steps = step
        self.store.forget_after(step)
        if step:
            self._load_state()
            self.served.publish(self.store.state_dir(step) / "adapter")
        for name, record in self.store.read_checkpoints().items():
            if Path(record["adapter_dir"]).is_dir():
                self.served.add_checkpoint(f"{self.state.job_id}/{name}", Path(record["adapter_dir"]))
                self.state.checkpoints[name] = record
        log.info("resumed job %s at step %d with checkpoints %s", self.state.job_id, step, sorted(self.state.checkpoints))

    # ---- the trainer ----------------------------------------------------------------------

    def _load_state(self) -> None:
        """The trainer loads its state after step `state.steps` (adapter, optimizer, scheduler, RNG)."""
        try:
            reply = self._trainer.call(ResumeCommand(self.store.state_dir(self.state.steps)),
                                       self.options.start_timeout, "resume the trainer", Resumed)
        except (TrainerGone, TrainerTimeout, TrainerRefused) as e:  # a trainer without the state must not train on
            self._trainer.kill()
            self._fail(f"could not resume the trainer at step {self.state.steps}: {e}")
        self.state.optimizer_steps = reply.optimizer_steps

    def _worker_spec(self) -> WorkerSpec:
        o = self.options
        nodes = None if o.nodes is None else replace(o.nodes, log_dir=o.run_dir / "torchelastic")
        return WorkerSpec(o.factory, o.model_path, o.config, o.device, o.processes, o.visible_devices,
                          o.run_dir / "trained" if o.record_trained else None, nodes)

    def _start_worker(self) -> None:
        spec = self._worker_spec()
        self._trainer: TrainerHandle = InProcessTrainer(spec) if self.options.in_process else TrainerProcess(spec)
        try:
            self._trainer.start(self.options.start_timeout)
        except (TrainerGone, TrainerTimeout) as e:
            self._fail(str(e))
        except TrainerRefused as e:
            raise self._refused(e) from e

    def _restart_worker(self, reason: str) -> None:
        """A dead worker comes back with the state of the last step; after MAX_RESTARTS the job fails."""
        if self.restarts >= MAX_RESTARTS:
            self._fail(f"{reason}; it was restarted {self.restarts} times already, so the job is failed")
        self.restarts += 1
        log.warning("%s; restarting it (restart %d of %d) from step %d", reason, self.restarts, MAX_RESTARTS,
                    self.state.steps)
        self._trainer.kill()
        self._start_worker()
        if self.state.steps:
            self._load_state()

    def _call(self, command: Command, timeout: float, what: str, expect: type[R]) -> R:
        """Run a command on the trainer; a worker that died is restarted first (nothing was lost), and one that
        dies during the command is restarted and the command fails with a retryable 503."""
        with self._lock:
            self.check_usable()
            if not self._trainer.alive:
                self._restart_worker(f"the trainer process had died (exit code {self._trainer.exitcode})")
            try:
                return self._trainer.call(command, timeout, what, expect)
            except TrainerGone as e:
                if self.state.status != "running":  # ended by supersede or cancel while the command ran
                    raise JobError(f"job {self.state.job_id} is {self.state.status}: {self.state.error}", 409) from e
                self._restart_worker(str(e))
                raise JobError(f"{e}; it was restarted from step {self.state.steps}: retry the request", 503) from e
            except TrainerTimeout as e:
                self._fail(str(e))
            except TrainerRefused as e:
                raise self._refused(e) from e

    def _refused(self, e: TrainerRefused) -> JobError:
        """A refused config is the client's 400; any other trainer error is a 500 that `status` reports."""
        if e.kind == "config":
            return JobError(str(e), 400)
        self.state.error = str(e)
        return JobError(str(e), 500)

    def _fail(self, message: str) -> None:
        if self.state.status in ("cancelled", "terminated"):  # ended on purpose while this command ran
            raise JobError(f"job {self.state.job_id} is {self.state.status}: {self.state.error or message}", 409)
        self.state.status, self.state.error = "failed", message
        log.error(message)
        raise JobError(message, 500)

    def check_usable(self) -> None:
        if self.state.status != "running":
            raise JobError(f"job {self.state.job_id} is {self.state.status}: {self.state.error or 'not running'}", 409)

    # ---- the job API -------------------------------------------------------------------

    @property
    def group_size(self) -> int | None:
        """`num_generations` when the client gave it (DSPy's GRPO does): every group must hold that many samples."""
        return self.options.config.num_generations

    @property
    def checkpoint_root(self) -> Path:
        return self.store.checkpoint_root

    def step(self, groups: tuple[Group, ...], batch_ids: tuple[int, ...] = ()) -> None:
        self.check_usable()
        step = self.state.steps + 1
        command = StepCommand(step, tuple(groups), self.store.export_dir(step), self.store.state_dir(step))
        result = self._call(command, self.options.step_timeout, "run a training step", StepDone)
        self.check_usable()  # superseded or cancelled while it trained: publish nothing
        self.state.steps = step
        self.state.optimizer_steps = result.optimizer_steps
        self.state.last_metrics = [m.to_dict() for m in result.metrics]
        self.state.last_swap_ms = self.served.publish(result.adapter)
        self.store.after_step(step)
        log.info("step %d: %d groups, adapter swap %.1f ms", self.state.steps, len(groups), self.state.last_swap_ms)
        self.batches.retire(batch_ids)

    def checkpoint(self, name: str, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """Save, and serve as `<model>@<job_id>/<name>`; returns the checkpoint's record (Arbor's shape + `model`)."""
        directory = self.checkpoint_root / name
        result = self._call(CheckpointCommand(directory), self.options.step_timeout, f"save checkpoint {name!r}",
                            CheckpointSaved)
        model = self.served.add_checkpoint(f"{self.state.job_id}/{name}", result.adapter)
        record = {"checkpoint_name": name, "checkpoint_dir": str(result.checkpoint), "adapter_dir": str(result.adapter),
                  "global_step": self.state.optimizer_steps, "metadata": metadata, "timestamp": time.time(),
                  "model": model}
        with self._lock:  # one writer of the records at a time
            self.state.checkpoints[name] = record
            self.state.last_checkpoint = name
            self.store.write_checkpoints(dict(self.state.checkpoints))
        return record

    def terminate(self) -> None:
        """Stop the worker gracefully; the current policy stays served."""
        if self.state.status == "running":
            self.state.status = "terminated"
        self._stop_worker()

    def supersede(self, reason: str) -> None:
        """End this job because another takes the server (a step in flight publishes nothing)."""
        if self.state.status not in ("running", "initializing"):
            return
        log.warning("GRPO job %s is still %s: ending it, %s", self.state.job_id, self.state.status, reason)
        self.state.status, self.state.error = "terminated", reason
        self._stop_worker()

    def cancel(self) -> None:
        if self.state.status in ("running", "initializing"):
            self.state.status = "cancelled"
        self._stop_worker()

    def _stop_worker(self) -> None:
        """Stop the trainer once the command in flight is answered; one busy past `STOP_GRACE_S` is killed."""
        if not self._lock.acquire(timeout=STOP_GRACE_S):
            self._trainer.kill()  # still busy (for a client that may be gone): its ranks elsewhere fail instead
            return
        try:
            self._trainer.stop(grace=STOP_GRACE_S)
        finally:
            self._lock.release()

    def status(self) -> JobStatus:
        s = self.state
        return JobStatus(
            job_id=s.job_id, status=s.status, current_model=self.served.model_id,
            checkpoints={c: dict(r) for c, r in s.checkpoints.items()}, last_checkpoint=s.last_checkpoint,
            pending_batch_ids=tuple(self.batches.ids) if s.status == "running" else (), error=s.error, steps=s.steps,
            optimizer_steps=s.optimizer_steps, trainer_restarts=self.restarts, last_swap_ms=s.last_swap_ms,
            metrics=tuple(s.last_metrics),
        )
