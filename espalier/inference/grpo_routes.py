"""Arbor's GRPO job routes: `/v1/fine_tuning/grpo/{initialize,step,status,checkpoint,cancel,terminate}`.

Request and response shapes follow Arbor (`GRPOStatus`: job_id, status, current_model,
checkpoints, last_checkpoint, pending_batch_ids), plus Espalier fields.

Departures from Arbor:
1. `initialize` accepts both Arbor layouts: flat train kwargs (older clients) or
   `trainer_config` (newer); keys whose value is null are defaults; any other key goes to
   `TrainConfig`, which rejects unknown ones with a 400 that lists the known keys.
2. `step` also accepts Espalier's `groups` (a list of `Group.to_dict()`), so token ids and
   sampling log-probs cross unchanged.
3. One job at a time (one engine, one policy). An `initialize` while a job runs ends that
   job (a logged warning; gracefully if idle, else its trainer is killed) and starts the new
   one; the old job's checkpoints stay served and its client's next call gets a 409 naming
   the job that replaced it. Why not a 409 (Arbor's answer) or an idle timeout: a client that
   crashed mid-compile never calls `terminate`, and no timeout can tell it from a client that
   is validating for an hour, so a 409 would wedge the server until it is restarted; the
   caller of `initialize` is the one user the server can hear. A bad new config is a 400
   before the running job is touched.
4. `resume_job` and `resume_step` (Espalier's) go on with an earlier job of this server's run
   directory from the trainer state saved after that step (job.py, `compile(..., resume=True)`).
5. `num_training_gpus` picks the trainer's devices and number of ranks (`training_placement`);
   more GPUs than the machine has is a 400 naming the fix, before any process starts.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from fastapi import FastAPI, Request
from jinja2 import TemplateError
from starlette.concurrency import run_in_threadpool

from espalier.inference import openai_api as oa
from espalier.inference.arbor_batch import check_groups, groups_from_batch
from espalier.inference.http_io import error_response, read_json
from espalier.inference.job import GRPOJob, JobError, JobOptions, training_placement
from espalier.inference.job_store import JobStore
from espalier.inference.serving import UnknownModel, strip_prefix
from espalier.inference.worker_protocol import TrainerFactory
from espalier.types import Group

_META = {"model", "suffix", "trainer_config", "inference_config", "gpu_config", "batches_per_step", "job_id",
         "wandb_kwargs", "grpo_flavor", "resume_job", "resume_step"}


MAX_BATCHES_PER_STEP = 1024
CHECKPOINT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def _object(body: dict[str, Any], name: str) -> dict[str, Any]:
    value = body.get(name) or {}
    if not isinstance(value, dict):
        raise oa.BadRequest(f"{name} must be an object, got {type(value).__name__}", name)
    return value


def _train_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    kwargs = {k: v for k, v in body.items() if k not in _META and v is not None}
    kwargs.update({k: v for k, v in _object(body, "trainer_config").items() if v is not None})
    gpu = _object(_object(body, "gpu_config"), "multi")
    for key in ("num_training_gpus", "num_inference_gpus"):
        if key in gpu and key not in kwargs:
            kwargs[key] = gpu[key]
    return kwargs


def _check_config(factory: TrainerFactory, kwargs: dict[str, Any]) -> None:
    """A bad train_kwargs is a 400 here, before a running job is ended for it."""
    try:
        factory.check(kwargs)
    except (ValueError, TypeError, OverflowError) as e:
        raise JobError(str(e), 400) from e


def _job(request: Request, body: dict[str, Any]) -> GRPOJob:
    job: GRPOJob | None = request.app.state.job
    if job is None:
        raise JobError("no GRPO job: call /v1/fine_tuning/grpo/initialize first", 404)
    given = body.get("job_id")
    if given is not None and not isinstance(given, str):
        raise oa.BadRequest(f"job_id must be a string, got {given!r}"[:200], "job_id")
    replaced_by = request.app.state.replaced.get(given)
    if replaced_by is not None:
        raise JobError(f"job {given} was ended because a new initialize started job {replaced_by}", 409)
    if given is not None and given != job.state.job_id:
        raise JobError(f"unknown job_id {given!r}; the current job is {job.state.job_id!r}", 404)
    return job


def _batches_per_step(body: dict[str, Any]) -> int:
    value = body.get("batches_per_step")
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BATCHES_PER_STEP:
        raise oa.BadRequest(f"batches_per_step must be an integer in [1, {MAX_BATCHES_PER_STEP}], got {value!r}",
                            "batches_per_step")
    return value


def _vocab_size(tokenizer, model_path) -> int:
    """Token ids the model can emit: its embedding rows (often more than the tokenizer's entries)."""
    rows = 0
    if model_path is not None:
        from transformers import AutoConfig

        rows = getattr(AutoConfig.from_pretrained(model_path), "vocab_size", 0) or 0
    return max(len(tokenizer), rows)


def _resume(body: dict[str, Any]) -> tuple[str, int] | None:
    """Espalier's extension: `resume_job` and `resume_step` go on with an earlier job of this run directory."""
    job, step = body.get("resume_job"), body.get("resume_step", 0)
    if job is None:
        return None
    if not isinstance(job, str) or not re.fullmatch(r"grpo-[0-9a-f]{12}", job):
        raise oa.BadRequest(f"resume_job must be a job id like 'grpo-0123456789ab', got {job!r}", "resume_job")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise oa.BadRequest(f"resume_step must be an integer >= 0, got {step!r}", "resume_step")
    return job, step


def _groups(body: dict[str, Any], tokenizer, vocab_size: int, max_model_len: int,
            group_size: int | None) -> tuple[list[Group], list[int]]:
    """The step's groups (Espalier's `groups` or an Arbor `batch`), checked against the served model."""
    try:
        if body.get("groups") is not None:
            if not isinstance(body["groups"], list):
                raise ValueError("groups must be a list of {key, samples} objects")
            groups, ids = [Group.from_dict(g) for g in body["groups"]], []
        else:
            groups, ids = groups_from_batch(body.get("batch"), tokenizer)
        check_groups(groups, vocab_size, max_model_len, group_size)
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, TemplateError) as e:
        raise oa.BadRequest(f"bad GRPO batch: {e}"[:2000], "batch") from e
    if not ids and isinstance(body.get("batch_id"), int):
        ids = [body["batch_id"]]  # Arbor's client: one group of members, its batch id beside it
    return groups, ids


def add_grpo_routes(app: FastAPI) -> None:
    served, settings = app.state.served, app.state.settings
    limit = settings.options.max_body_bytes
    app.state.replaced = {}  # job_id -> the job_id of the job whose initialize ended it
    vocab = _vocab_size(served.engine.tokenizer, settings.model_path)

    @app.exception_handler(JobError)
    async def joberror_response(_: Request, e: JobError):
        return error_response(e.status, str(e))

    starting = asyncio.Lock()  # two initialize calls at once: the second supersedes the first, never both run

    @app.post("/v1/fine_tuning/grpo/initialize")
    async def initialize(request: Request):
        body = await read_json(request, limit)
        async with starting:
            return await _initialize(body)

    async def _initialize(body: dict[str, Any]):
        model = body.get("model")
        if not isinstance(model, str) or strip_prefix(model).partition("@")[0] not in served.aliases:
            raise UnknownModel(f"this server trains {served.model_id!r}, not {model!r}")
        kwargs, batches, resume = _train_kwargs(body), _batches_per_step(body), _resume(body)
        device, processes, visible = training_placement(kwargs, settings.options.train_processes)
        if resume is not None and resume[1] and resume[1] not in JobStore(settings.options.run_dir, resume[0]).saved_steps():
            raise JobError(f"cannot resume job {resume[0]} at step {resume[1]}: this server's run directory "
                           f"{settings.options.run_dir} holds no state saved after that step", 409)  # before ending a job
        _check_config(settings.trainer_factory, kwargs)
        current: GRPOJob | None = app.state.job
        superseded = current is not None and current.state.status in ("running", "initializing")
        if superseded:
            await run_in_threadpool(current.supersede, "a new initialize took over the server")
        options = JobOptions(
            model_path=settings.model_path, run_dir=settings.options.run_dir, train_kwargs=kwargs,
            device=device, batches_per_step=batches,
            step_timeout=settings.options.request_timeout * 6, factory=settings.trainer_factory,
            record_trained=settings.options.record_trained,
            processes=processes, visible_devices=visible, resume=resume, nodes=settings.options.nodes(),
        )
        job = await run_in_threadpool(GRPOJob, served, options)
        if superseded and current.state.job_id != job.state.job_id:
            app.state.replaced[current.state.job_id] = job.state.job_id
        app.state.replaced.pop(job.state.job_id, None)  # a resumed job answers to its id again
        app.state.job = job
        return job.status()

    @app.post("/v1/fine_tuning/grpo/status")
    async def status(request: Request):
        return _job(request, await read_json(request, limit)).status()

    @app.get("/v1/fine_tuning/grpo/status")
    async def status_get(request: Request):
        return _job(request, dict(request.query_params)).status()

    @app.post("/v1/fine_tuning/grpo/step")
    async def step(request: Request):
        body = await read_json(request, limit)
        job = _job(request, body)
        job.check_usable()  # a step to an ended job is a 409 whatever its groups
        groups, ids = _groups(body, served.engine.tokenizer, vocab, served.engine.max_model_len, job.group_size)
        await run_in_threadpool(job.step, groups, ids)
        return job.status()

    @app.post("/v1/fine_tuning/grpo/checkpoint")
    async def checkpoint(request: Request):
        body = await read_json(request, limit)
        job = _job(request, body)
        name = body.get("checkpoint_name")
        if not isinstance(name, str) or not CHECKPOINT_NAME.fullmatch(name) or name == "base":
            raise oa.BadRequest("checkpoint_name must be 1-128 letters, digits, '.', '-' or '_', not starting with "
                                "'.', and not 'base'", "checkpoint_name")
        metadata = body.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise oa.BadRequest("metadata must be an object", "metadata")
        await run_in_threadpool(job.checkpoint, name, metadata)
        return job.status()

    @app.post("/v1/fine_tuning/grpo/cancel")
    async def cancel(request: Request):
        job = _job(request, await read_json(request, limit))
        await run_in_threadpool(job.cancel)
        return job.status()

    @app.post("/v1/fine_tuning/grpo/terminate")
    async def terminate(request: Request):
        job = _job(request, await read_json(request, limit))
        await run_in_threadpool(job.terminate)
        return job.status()
