"""Arbor's GRPO job routes: `/v1/fine_tuning/grpo/{initialize,step,status,checkpoint,cancel,terminate}`.

Request and response shapes follow Arbor (`GRPOStatus`: job_id, status, current_model,
checkpoints, last_checkpoint, pending_batch_ids), plus Espalier fields.

Arbor's wire formats (the initialize and batch layouts, `pending_batch_ids`, `gpu_config`) are
read by `arbor_wire.py` into `InitializeRequest`, `StepRequest` and `CheckpointRequest`; the
routes below see only those types.

Departures from Arbor:
1. The wire formats' departures are in arbor_wire.py.
2. One job at a time (one engine, one policy). An `initialize` while a job runs ends that
   job (a logged warning; gracefully if idle, else its trainer is killed) and starts the new
   one; the old job's checkpoints stay served and its client's next call gets a 409 naming
   the job that replaced it. Why not a 409 (Arbor's answer) or an idle timeout: a client that
   crashed mid-compile never calls `terminate`, and no timeout can tell it from a client that
   is validating for an hour, so a 409 would wedge the server until it is restarted; the
   caller of `initialize` is the one user the server can hear. A bad new config is a 400
   before the running job is touched.
3. `resume_job` and `resume_step` (Espalier's) go on with an earlier job of this server's run
   directory from the trainer state saved after that step (job.py, `compile(..., resume=True)`).
4. `num_training_gpus` picks the trainer's devices and number of ranks (`training_placement`);
   more GPUs than the machine has is a 400 naming the fix, before any process starts.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from espalier.inference import arbor_wire as wire
from espalier.inference.http_io import error_response, read_json
from espalier.inference.job import GRPOJob, JobError, JobOptions, training_placement
from espalier.inference.job_store import JobStore
from espalier.inference.serving import UnknownModel, strip_prefix


def _job(request: Request, body: dict[str, Any]) -> GRPOJob:
    job: GRPOJob | None = request.app.state.job
    if job is None:
        raise JobError("no GRPO job: call /v1/fine_tuning/grpo/initialize first", 404)
    given = wire.job_id(body)
    replaced_by = request.app.state.replaced.get(given)
    if replaced_by is not None:
        raise JobError(f"job {given} was ended because a new initialize started job {replaced_by}", 409)
    if given is not None and given != job.state.job_id:
        raise JobError(f"unknown job_id {given!r}; the current job is {job.state.job_id!r}", 404)
    return job


def _vocab_size(tokenizer, model_path) -> int:
    """Token ids the model can emit: its embedding rows (often more than the tokenizer's entries)."""
    rows = 0
    if model_path is not None:
        from transformers import AutoConfig

        rows = getattr(AutoConfig.from_pretrained(model_path), "vocab_size", 0) or 0
    return max(len(tokenizer), rows)


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
        asked = wire.initialize_request(body)
        _check_resumable(asked.resume)  # before a running job is ended for it
        current: GRPOJob | None = app.state.job
        superseded = current is not None and current.state.status in ("running", "initializing")
        if superseded:
            await run_in_threadpool(current.supersede, "a new initialize took over the server")
        job = await run_in_threadpool(GRPOJob, served, _job_options(asked))
        if superseded and current.state.job_id != job.state.job_id:
            app.state.replaced[current.state.job_id] = job.state.job_id
        app.state.replaced.pop(job.state.job_id, None)  # a resumed job answers to its id again
        app.state.job = job
        return job.status().to_dict()

    def _check_resumable(resume: tuple[str, int] | None) -> None:
        run_dir = settings.options.run_dir
        if resume is not None and resume[1] and resume[1] not in JobStore(run_dir, resume[0]).saved_steps():
            raise JobError(f"cannot resume job {resume[0]} at step {resume[1]}: this server's run directory "
                           f"{run_dir} holds no state saved after that step", 409)

    def _job_options(asked: wire.InitializeRequest) -> JobOptions:
        o = settings.options
        device, processes, visible = training_placement(asked.config, o.train_processes)
        return JobOptions(
            model_path=settings.model_path, run_dir=o.run_dir, config=asked.config, device=device,
            batches_per_step=asked.batches_per_step, step_timeout=o.request_timeout * 6,
            factory=settings.trainer_factory, record_trained=o.record_trained, processes=processes,
            visible_devices=visible, resume=asked.resume, nodes=o.nodes(), in_process=o.train_in_process,
        )

    @app.post("/v1/fine_tuning/grpo/status")
    async def status(request: Request):
        return _job(request, await read_json(request, limit)).status().to_dict()

    @app.get("/v1/fine_tuning/grpo/status")
    async def status_get(request: Request):
        return _job(request, dict(request.query_params)).status().to_dict()

    @app.post("/v1/fine_tuning/grpo/step")
    async def step(request: Request):
        body = await read_json(request, limit)
        job = _job(request, body)
        job.check_usable()  # a step to an ended job is a 409 whatever its groups
        asked = wire.step_request(body, served.engine.tokenizer, vocab, served.engine.max_model_len, job.group_size)
        await run_in_threadpool(job.step, asked.groups, asked.batch_ids)
        return job.status().to_dict()

    @app.post("/v1/fine_tuning/grpo/checkpoint")
    async def checkpoint(request: Request):
        body = await read_json(request, limit)
        job = _job(request, body)
        asked = wire.checkpoint_request(body)
        await run_in_threadpool(job.checkpoint, asked.name, asked.metadata)
        return job.status().to_dict()

    @app.post("/v1/fine_tuning/grpo/cancel")
    async def cancel(request: Request):
        job = _job(request, await read_json(request, limit))
        await run_in_threadpool(job.cancel)
        return job.status().to_dict()

    @app.post("/v1/fine_tuning/grpo/terminate")
    async def terminate(request: Request):
        job = _job(request, await read_json(request, limit))
        await run_in_threadpool(job.terminate)
        return job.status().to_dict()
