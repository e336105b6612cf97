"""The server's HTTP plumbing: the app state key, errors in OpenAI's shape, the bounded body
read, and the small endpoints (`/healthz`, `/readyz`, `/v1/models`, `/metrics`).

Kept apart from the completion handlers because none of this touches generation: it is what
every request goes through, or what probes and scrapers call, and reads only the app state.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from kubetune_trainer.serve.metrics import Metrics
from kubetune_trainer.serve.protocol import ApiError, Limits
from kubetune_trainer.serve.requests import parse_json

ENGINE: web.AppKey[Any] = web.AppKey("engine", object)
STATE: web.AppKey[dict[str, Any]] = web.AppKey("state", dict)


def error_response(error: ApiError) -> web.Response:
    return web.json_response(error.body(), status=error.status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every HTTP-level failure (404, 405, 413, ...) in OpenAI's error shape too."""
    try:
        return await handler(request)
    except ApiError as error:
        return error_response(error)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        kind = "invalid_request_error" if error.status < 500 else "server_error"
        return error_response(ApiError(error.status, error.reason, kind=kind))


async def read_body(request: web.Request, limits: Limits) -> dict[str, Any]:
    too_large = ApiError(
        413, f"request body exceeds {limits.max_body_bytes} bytes", code="request_too_large"
    )
    if (request.content_length or 0) > limits.max_body_bytes:
        raise too_large
    body = await request.content.read(limits.max_body_bytes + 1)
    if len(body) > limits.max_body_bytes:
        raise too_large
    return parse_json(body)


def served_name(request: web.Request) -> str:
    return str(request.app[STATE]["name"])


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state["draining"]:
        return web.json_response({"status": "draining"}, status=503)
    if state["error"]:
        return web.json_response({"status": "failed", "error": state["error"]}, status=503)
    if not state["ready"]:
        return web.json_response({"status": "loading"}, status=503)
    return web.json_response({"status": "ready"})


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    entry = {
        "id": state["name"],
        "object": "model",
        "created": state["created"],
        "owned_by": "kubetune",
    }
    return web.json_response({"object": "list", "data": [entry]})


async def metrics_endpoint(request: web.Request) -> web.Response:
    metrics: Metrics = request.app[STATE]["metrics"]
    engine = request.app[STATE].get("engine")
    if engine is not None:
        metrics.set_load(engine.running, engine.admitted - engine.running)
    return web.Response(body=metrics.render(), headers={"Content-Type": metrics.content_type})
