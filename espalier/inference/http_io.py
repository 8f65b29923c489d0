"""HTTP plumbing shared by the server's routes: bodies read with limits and timeouts, JSON errors in OpenAI's
shape, and the two ASGI middlewares (`//` collapsed, the API key required)."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from espalier.inference import openai_api as oa

BODY_READ_TIMEOUT = 30.0  # seconds a client may pause while sending its body


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


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
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
                response = error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)
