"""The Espalier HTTP server: OpenAI-compatible generation plus Arbor's GRPO job routes.

`python -m espalier.inference.server --model ...` (or `espalier serve`) runs it; `create_app`
builds the FastAPI app around a `ServedModel` for tests.

Departures from Arbor:
1. The server applies the chat template itself and hands token ids to the engine, so the
   `prompt_token_ids` it returns are the ones that were sampled from.
2. Binds 127.0.0.1 by default; an API key (`--api-key` or `ESPALIER_API_KEY`) is enforced
   on every route but `/health` (401 without it).
3. Every failure is a JSON error in OpenAI's shape: 400 for malformed JSON or impossible
   sampling values, 404 for an unknown model, 413 for an oversize body, 503 when the engine
   is down; every wait on the engine or trainer has a timeout.
4. A request whose client disconnects stops generating at the engine's next decode step
   (transformers engine; vLLM's own server finishes it), so abandoned requests free their rows.
5. Repeated slashes in a path are one (`/v1//models` is `/v1/models`): `init()` returns
   `.../v1/` as Arbor's does (its client joins routes with `urljoin`), and code that appends
   `/models` to it still works.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from jinja2 import TemplateError
from starlette.concurrency import run_in_threadpool

from espalier.inference import openai_api as oa
from espalier.inference.chat import normalize_messages, prompt_ids
from espalier.inference.engine import EngineError, EngineUnavailable
from espalier.inference.grpo_routes import add_grpo_routes
from espalier.inference.http_io import CollapseSlashes, RequireKey, error_response, read_json
from espalier.inference.replicas import ReplicaSet
from espalier.inference.server_options import ServerOptions, parse_server_options, server_parser
from espalier.inference.serving import ServedModel, UnknownModel
from espalier.training.protocol import TrainerFactory
from espalier.training.worker import DEFAULT_FACTORY

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ServerSettings:
    """What the app reads: the process's options, the model's local path and the trainer the jobs build."""

    options: ServerOptions = field(default_factory=ServerOptions)
    model_path: Path | None = None
    trainer_factory: TrainerFactory = DEFAULT_FACTORY  # what the GRPO worker builds its trainer with


DISCONNECT_POLL_S = 0.5  # how often a generating request checks that its client is still there


def create_app(served: ServedModel, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="espalier")
    app.add_middleware(RequireKey, api_key=settings.options.api_key)
    app.add_middleware(CollapseSlashes)  # added last, so it runs first: the key check sees the collapsed path
    app.state.served = served
    app.state.settings = settings
    app.state.job = None
    tokenizer = served.engine.tokenizer

    @app.exception_handler(oa.BadRequest)
    async def bad_request(_: Request, e: oa.BadRequest):
        return error_response(e.status, str(e), e.param)

    @app.exception_handler(UnknownModel)
    async def unknown_model(_: Request, e: UnknownModel):
        return error_response(404, str(e.args[0]), "model")

    @app.exception_handler(EngineUnavailable)
    async def engine_down(_: Request, e: EngineUnavailable):
        return error_response(503, f"the engine is unavailable: {e}; retry shortly, it is being restarted")

    @app.exception_handler(EngineError)
    async def engineerror_response(_: Request, e: EngineError):
        return error_response(500, str(e))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception):
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(e).__name__}: {e}")

    @app.get("/health")
    async def health():
        body = {"status": "ok", "engine_alive": served.engine.alive(), "model": served.model_id}
        if isinstance(served.engine, ReplicaSet):  # --inference-replicas N: each one's state and request counts
            body["replicas"] = [asdict(r) for r in served.engine.status()]
        return body

    @app.get("/v1/models")
    async def models():
        data = [{"id": m, "object": "model", "owned_by": "espalier"} for m in served.model_names()]
        return {"object": "list", "data": data}

    async def _generate(http: Request, body: dict[str, Any], prompt: list[int], top_logprobs: int):
        model = body.get("model")
        if not isinstance(model, str):
            raise oa.BadRequest("model must be a string", "model")
        adapter = served.resolve(model)
        cancel = threading.Event()
        request = replace(oa.sampling_request(body, prompt, adapter, served.engine.max_model_len, top_logprobs),
                          cancel=cancel)
        work = asyncio.ensure_future(run_in_threadpool(served.generate, request, settings.options.request_timeout))
        while not (await asyncio.wait({work}, timeout=DISCONNECT_POLL_S))[0]:
            if await http.is_disconnected():  # nobody will read the answer: stop generating it
                cancel.set()
        return model, await work

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_json(request, settings.options.max_body_bytes)
        try:
            messages = normalize_messages(body.get("messages"))
            prompt = prompt_ids(tokenizer, messages, bool(body.get("continue_final_message", False)))
        except (ValueError, TemplateError) as e:  # the model's chat template refuses these messages
            raise oa.BadRequest(f"{type(e).__name__}: {e}", "messages") from e
        model, seqs = await _generate(request, body, prompt, oa.chat_top_logprobs(body))
        return oa.chat_response(model, prompt, seqs, tokenizer, bool(body.get("logprobs")))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request, settings.options.max_body_bytes)
        prompt = oa.completion_prompt(body, tokenizer)
        model, seqs = await _generate(request, body, prompt, oa.completion_top_logprobs(body))
        return oa.completion_response(model, prompt, seqs, tokenizer, body.get("logprobs") not in (None, False))

    add_grpo_routes(app)
    return app


def checkpoint_name(adapter: Path) -> str:
    """The name a program saved by `compile` refers to: `.../checkpoints/<job_id>/step-8/adapter` ->
    "<job_id>/step-8" (a job's checkpoint, job.py), `.../step-8/adapter` or `.../step-8` -> "step-8"."""
    adapter = Path(adapter)
    directory = adapter.parent if adapter.name == "adapter" else adapter
    if directory.parent.parent.name == "checkpoints":
        return f"{directory.parent.name}/{directory.name}"
    return directory.name


def build_app(options: ServerOptions) -> FastAPI:
    from espalier.inference.factory import make_engine, resolve_model_path

    path = resolve_model_path(options.model)
    engine = make_engine(path, options.engine, options.num_inference_gpus, options.engine_start_timeout,
                         options.inference_replicas)
    log.info("engine: %s, %d replica(s), %d inference GPU(s)", type(engine).__name__, options.inference_replicas,
             options.num_inference_gpus)
    served = ServedModel(engine, options.model, aliases=(str(path),))
    if options.adapter is not None:
        served.publish(options.adapter)
        served.add_checkpoint(checkpoint_name(options.adapter), options.adapter)  # a saved program's `<id>@<name>`
    return create_app(served, ServerSettings(options, path))


def serve_main(argv: list[str] | None = None) -> None:
    """`espalier serve`: parse the flags and run the server in the foreground; a wrong flag is a usage error."""
    options = parse_server_options(argv)
    try:
        check(options)
    except ValueError as e:
        server_parser().error(str(e))
    _run(options)


def check(options: ServerOptions) -> None:
    """Before the model loads: settings that contradict each other are a ValueError naming the fix."""
    from espalier.inference.factory import replica_gpus

    options.nodes()
    replica_gpus(options.num_inference_gpus, options.inference_replicas)


def serve_forever(options: ServerOptions) -> None:
    """Run the server in the foreground until interrupted; contradicting settings are a ValueError."""
    check(options)
    _run(options)


def _run(options: ServerOptions) -> None:
    import socket

    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((options.host, options.port))
    print(f"espalier: serving {options.model} on http://{options.host}:{sock.getsockname()[1]}/v1", flush=True)
    try:
        # SIGTERM: requests in flight (a step's rollouts, a training step) get 10 s, then the server exits
        uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_keep_alive=30,
                                      timeout_graceful_shutdown=10)).run(sockets=[sock])
    finally:
        if app.state.job is not None:
            app.state.job.cancel()
        app.state.served.engine.close()


if __name__ == "__main__":
    serve_main()
