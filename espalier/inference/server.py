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

import argparse
import asyncio
import json
import logging
import os
import re
import secrets
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from jinja2 import TemplateError
from starlette.concurrency import run_in_threadpool

from espalier.inference import openai_api as oa
from espalier.inference.chat import normalize_messages, prompt_ids
from espalier.inference.engine import EngineError, EngineUnavailable
from espalier.inference.job_worker import DEFAULT_FACTORY
from espalier.inference.replicas import ReplicaSet
from espalier.inference.serving import ServedModel, UnknownModel
from espalier.training.distributed import DEFAULT_TIMEOUT_S

if TYPE_CHECKING:
    from espalier.training.distributed import TrainNodes

log = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    api_key: str | None = None
    max_body_bytes: int = 64 * 1024 * 1024
    request_timeout: float = 600.0
    run_dir: Path = Path("runs/serve")
    model_path: Path | None = None
    record_trained: bool = False  # the trainer appends every sequence it feeds to run_dir/trained/*.jsonl
    train_processes: int = 0  # > 0: GRPO jobs train on this many CPU ranks (gloo) per node; 0 = from num_training_gpus
    train_nodes: TrainNodes | None = None  # GRPO jobs train on several nodes that meet at this rendezvous
    trainer_factory: str = DEFAULT_FACTORY  # "module:callable" the GRPO worker builds its trainer with (tests: a fake)


BODY_READ_TIMEOUT = 30.0  # seconds a client may pause while sending its body
DISCONNECT_POLL_S = 0.5  # how often a generating request checks that its client is still there


async def read_body(request: Request, limit: int) -> bytes:
    """The body, read chunk by chunk: a 413 as soon as it passes `limit` (declared or not), a 408 on a stalled client."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise oa.BadRequest(f"request body of {declared} bytes exceeds the limit of {limit}", None, 413)
    chunks, size, stream = [], 0, request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(anext(stream), BODY_READ_TIMEOUT)
        except StopAsyncIteration:
            return b"".join(chunks)
        except TimeoutError as e:
            raise oa.BadRequest(f"the body stalled for {BODY_READ_TIMEOUT:.0f} s; send it whole", None, 408) from e
        size += len(chunk)
        if size > limit:
            raise oa.BadRequest(f"request body exceeds the limit of {limit} bytes", None, 413)
        chunks.append(chunk)


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    body = await read_body(request, limit)
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise oa.BadRequest(f"malformed JSON body: {e}") from e
    except RecursionError as e:
        raise oa.BadRequest("the JSON body is nested too deeply") from e
    if not isinstance(data, dict):
        raise oa.BadRequest("the JSON body must be an object")
    return data


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(oa.error_body(message, status, param), status_code=status)


class CollapseSlashes:
    """ASGI middleware: `//` in a request path is `/` (see departure 5)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and "//" in scope["path"]:
            scope = dict(scope, path=re.sub("/{2,}", "/", scope["path"]))
        await self.app(scope, receive, send)


class RequireKey:
    """ASGI middleware: every route but `/health` needs `Authorization: Bearer <key>` (constant-time compare).
    Plain ASGI, not `@app.middleware`, so a route still sees its client disconnect."""

    def __init__(self, app, api_key: str | None) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.expected is not None and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                response = _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(served: ServedModel, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="espalier")
    app.add_middleware(RequireKey, api_key=settings.api_key)
    app.add_middleware(CollapseSlashes)  # added last, so it runs first: the key check sees the collapsed path
    app.state.served = served
    app.state.settings = settings
    app.state.job = None
    tokenizer = served.engine.tokenizer

    @app.exception_handler(oa.BadRequest)
    async def bad_request(_: Request, e: oa.BadRequest):
        return _error(e.status, str(e), e.param)

    @app.exception_handler(UnknownModel)
    async def unknown_model(_: Request, e: UnknownModel):
        return _error(404, str(e.args[0]), "model")

    @app.exception_handler(EngineUnavailable)
    async def engine_down(_: Request, e: EngineUnavailable):
        return _error(503, f"the engine is unavailable: {e}; retry shortly, it is being restarted")

    @app.exception_handler(EngineError)
    async def engine_error(_: Request, e: EngineError):
        return _error(500, str(e))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception):
        log.exception("unhandled error")
        return _error(500, f"internal error: {type(e).__name__}: {e}")

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
        work = asyncio.ensure_future(run_in_threadpool(served.generate, request, settings.request_timeout))
        while not (await asyncio.wait({work}, timeout=DISCONNECT_POLL_S))[0]:
            if await http.is_disconnected():  # nobody will read the answer: stop generating it
                cancel.set()
        return model, await work

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_json(request, settings.max_body_bytes)
        try:
            messages = normalize_messages(body.get("messages"))
            prompt = prompt_ids(tokenizer, messages, bool(body.get("continue_final_message", False)))
        except (ValueError, TemplateError) as e:  # the model's chat template refuses these messages
            raise oa.BadRequest(f"{type(e).__name__}: {e}", "messages") from e
        model, seqs = await _generate(request, body, prompt, oa.chat_top_logprobs(body))
        return oa.chat_response(model, prompt, seqs, tokenizer, bool(body.get("logprobs")))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request, settings.max_body_bytes)
        prompt = oa.completion_prompt(body, tokenizer)
        model, seqs = await _generate(request, body, prompt, oa.completion_top_logprobs(body))
        return oa.completion_response(model, prompt, seqs, tokenizer, body.get("logprobs") not in (None, False))

    from espalier.inference.grpo_routes import add_grpo_routes

    add_grpo_routes(app)
    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="espalier serve", description="Serve a model (and its GRPO job) over HTTP.")
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="HF id, local HF dir or .gguf")
    p.add_argument("--engine", default="auto", choices=["auto", "vllm", "transformers"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = a free port")
    p.add_argument("--api-key", default=os.environ.get("ESPALIER_API_KEY"))
    p.add_argument("--num-inference-gpus", type=int, default=0)
    p.add_argument("--inference-replicas", type=int, default=1, metavar="N",
                   help="run N engine processes and spread requests over them (fewest in flight first); "
                        "--num-inference-gpus is split evenly between them, CPU cores likewise. A replica that dies "
                        "is restarted and its requests are retried on another; /health lists the replicas")
    p.add_argument("--adapter", type=Path, default=None, help="serve this saved peft adapter as the current policy")
    p.add_argument("--run-dir", type=Path, default=Path("runs/serve"))
    p.add_argument("--max-body-bytes", type=int, default=64 * 1024 * 1024)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--engine-start-timeout", type=float, default=900.0)
    p.add_argument("--record-trained", action="store_true",
                   help="append every sequence the trainer feeds to RUN_DIR/trained/step-N.jsonl (audits, tests)")
    p.add_argument("--train-processes", type=int, default=0,
                   help="train GRPO jobs on N CPU processes (gloo), for CPU clusters and tests; "
                        "0 = follow the job's num_training_gpus")
    p.add_argument("--train-nodes", type=int, default=1,
                   help="train GRPO jobs on N nodes: this one (the head) and N-1 that run "
                        "`torchrun ... -m espalier.inference.join` (needs --train-rdzv-endpoint)")
    p.add_argument("--train-rdzv-endpoint", default=None, metavar="HOST:PORT",
                   help="address of this machine where the other training nodes' torchrun meets it (--rdzv-endpoint)")
    p.add_argument("--train-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="with --train-nodes: seconds a training collective waits for the other nodes before the "
                        "job fails")
    return p


def train_nodes(args: argparse.Namespace) -> TrainNodes | None:
    """The training nodes the flags ask for; None for this node alone. A half-given pair is a ValueError."""
    from espalier.training.distributed import TrainNodes

    if args.train_nodes == 1 and args.train_rdzv_endpoint is None:
        return None
    if args.train_rdzv_endpoint is None:
        raise ValueError(f"--train-nodes {args.train_nodes} needs --train-rdzv-endpoint HOST:PORT, an address of "
                         "this machine that the other nodes reach (the --rdzv-endpoint of their torchrun)")
    return TrainNodes(args.train_rdzv_endpoint, args.train_nodes, timeout_s=args.train_timeout)


def checkpoint_name(adapter: Path) -> str:
    """The name a program saved by `compile` refers to: `.../checkpoints/<job_id>/step-8/adapter` ->
    "<job_id>/step-8" (a job's checkpoint, job.py), `.../step-8/adapter` or `.../step-8` -> "step-8"."""
    adapter = Path(adapter)
    directory = adapter.parent if adapter.name == "adapter" else adapter
    if directory.parent.parent.name == "checkpoints":
        return f"{directory.parent.name}/{directory.name}"
    return directory.name


def build_app(args: argparse.Namespace) -> FastAPI:
    from espalier.inference.factory import make_engine, resolve_model_path

    path = resolve_model_path(args.model)
    engine = make_engine(path, args.engine, args.num_inference_gpus, args.engine_start_timeout, args.inference_replicas)
    log.info("engine: %s, %d replica(s), %d inference GPU(s)", type(engine).__name__, args.inference_replicas,
             args.num_inference_gpus)
    served = ServedModel(engine, args.model, aliases=(str(path),))
    if args.adapter is not None:
        served.publish(args.adapter)
        served.add_checkpoint(checkpoint_name(args.adapter), args.adapter)  # a saved program's `<id>@<name>` works
    settings = ServerSettings(args.api_key, args.max_body_bytes, args.request_timeout, args.run_dir, path,
                              args.record_trained, train_processes=args.train_processes, train_nodes=train_nodes(args))
    return create_app(served, settings)


def serve_main(argv: list[str] | None = None) -> None:
    """Run the server in the foreground (what `espalier serve` delegates to)."""
    import socket

    import uvicorn

    from espalier.inference.factory import replica_gpus

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # before the model loads: a wrong flag is a usage error that names the fix
        train_nodes(args)
        replica_gpus(args.num_inference_gpus, args.inference_replicas)
    except ValueError as e:
        parser.error(str(e))
    app = build_app(args)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    print(f"espalier: serving {args.model} on http://{args.host}:{sock.getsockname()[1]}/v1", flush=True)
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
