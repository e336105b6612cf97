"""The server's HTTP plumbing: errors in OpenAI's shape, the API key check, the bounded body
read, and the small endpoints (`/healthz`, `/readyz`, `/v1/models`, `/metrics`,
`/openapi.json`).

Kept apart from the completion handlers because none of this touches generation: it is what
every request goes through, or what probes and scrapers call, and reads only the app state.
"""

from __future__ import annotations

import hmac
import logging
import math
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from kubetune_trainer.serve.protocol import Limits, RequestError
from kubetune_trainer.serve.requests import parse_json
from kubetune_trainer.serve.schema import OPEN_PATHS, openapi_document
from kubetune_trainer.serve.state import STATE

log = logging.getLogger("kubetune.serve")


def error_response(error: RequestError) -> web.Response:
    return web.json_response(error.body(), status=error.status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every HTTP-level failure (404, 405, 413, ...) and every unexpected exception (500) in
    OpenAI's error shape too, never aiohttp's plain-text page."""
    try:
        return await handler(request)
    except RequestError as error:
        return error_response(error)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        kind = "invalid_request_error" if error.status < 500 else "server_error"
        return error_response(RequestError(error.status, error.reason, kind=kind))
    except Exception:  # a bug: still a JSON error a client can read, and a logged traceback
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return error_response(
            RequestError(500, "internal server error", kind="server_error", code="internal_error")
        )


def authorized(header: str | None, api_key: str) -> bool:
    """Whether an `Authorization` header carries `api_key` as its Bearer credential. The
    scheme is case-insensitive (RFC 9110), the key is compared whole and in constant time, as
    bytes (a header need not be ASCII; `compare_digest` refuses non-ASCII str)."""
    scheme, _, credential = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    offered = credential.lstrip(" ").encode("utf-8", "surrogatepass")
    return hmac.compare_digest(offered, api_key.encode())


def unauthorized(header: str | None) -> web.Response:
    """The 401 OpenAI answers a missing or wrong key with, never echoing what was sent."""
    message = (
        "Incorrect API key provided."
        if header
        else "No API key provided: send it as the header `Authorization: Bearer <key>`."
    )
    response = error_response(
        RequestError(401, message, code="invalid_api_key", kind="invalid_request_error")
    )
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def api_key_middleware(api_key: str) -> Middleware:
    """Every route but `OPEN_PATHS` needs `Authorization: Bearer <api_key>`; unknown paths
    too, so a client without the key learns not even which routes exist. Decided on the
    route aiohttp matched, not on the raw path, so no spelling of a path reaches a handler
    without the check."""

    @web.middleware
    async def check_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        if resource is not None and resource.canonical in OPEN_PATHS:
            return await handler(request)
        header = request.headers.get("Authorization")
        if not authorized(header, api_key):
            return unauthorized(header)
        return await handler(request)

    return check_api_key


async def read_body(request: web.Request, limits: Limits) -> dict[str, Any]:
    too_large = RequestError(
        413, f"request body exceeds {limits.max_body_bytes} bytes", code="request_too_large"
    )
    if (request.content_length or 0) > limits.max_body_bytes:
        raise too_large
    body = await request.content.read(limits.max_body_bytes + 1)
    if len(body) > limits.max_body_bytes:
        raise too_large
    return parse_json(body)


def liveness(
    stalled_seconds: float, limit: float, load_error: str | None = None
) -> tuple[int, dict[str, Any]]:
    """`/healthz`'s answer: alive, unless the model failed to load (`load_error`: nothing
    will ever serve, and a restart may find the files, memory or node it lacked), or the
    engine has had work and not advanced for more than `limit` seconds (a wedged step never
    returns, and only a restart frees its slots). An idle engine, or one still loading, is
    alive: loading a large model takes minutes, and a restart would only start it again."""
    if load_error is not None:
        return 503, {"status": "failed", "error": load_error}
    if stalled_seconds > limit:
        message = (
            "the engine's thread has stopped"
            if math.isinf(stalled_seconds)
            else f"the engine has had work and not advanced for {stalled_seconds:.0f}s"
        )
        return 503, {"status": "stalled", "error": message}
    return 200, {"status": "alive"}


async def healthz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    stalled = 0.0 if state.engine is None else state.engine.stalled_seconds()
    status, body = liveness(stalled, state.limits.engine_stall_seconds, state.error)
    return web.json_response(body, status=status)


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.draining:
        return web.json_response({"status": "draining"}, status=503)
    if state.error:
        return web.json_response({"status": "failed", "error": state.error}, status=503)
    if state.engine is None:
        return web.json_response({"status": "loading"}, status=503)
    return web.json_response({"status": "ready"})


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    base = {"id": state.name, "object": "model", "created": state.created, "owned_by": "kubetune"}
    # vLLM's listing: an adapter names its base as `parent`. vLLM's `root` is the adapter's
    # directory, a path on the server that clients have no use for: here it is the name.
    adapters = [
        {**base, "id": name, "parent": state.name, "root": name} for name in state.adapters
    ]
    return web.json_response({"object": "list", "data": [base, *adapters]})


async def metrics_endpoint(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.engine is not None:
        running = state.engine.running
        state.metrics.set_load(
            running, state.admission.admitted - running, state.engine.kv_cache_usage()
        )
    return web.Response(
        body=state.metrics.render(), headers={"Content-Type": state.metrics.content_type}
    )


async def openapi(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(
        openapi_document(state.limits, state.name, api_key=state.api_key_required)
    )
