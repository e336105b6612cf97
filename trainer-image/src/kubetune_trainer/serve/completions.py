"""The `/v1/completions` and `/v1/chat/completions` handlers: admission, then one generation
answered as a JSON body or as a server-sent event stream.

Separate from the app wiring and the small endpoints because this is where a request meets an
engine: admission and release, the in-flight count that draining waits on, and the event loop
that turns engine events into chunks, with cancellation when the client goes away.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from kubetune_trainer.serve.engines.base import Engine
from kubetune_trainer.serve.http import error_response, read_body, served_name
from kubetune_trainer.serve.metrics import Metrics
from kubetune_trainer.serve.protocol import (
    GenerationRequest,
    RequestError,
    chunk,
    full_response,
    usage,
    usage_chunk,
)
from kubetune_trainer.serve.requests import parse_request
from kubetune_trainer.serve.state import STATE


def completion_handler(chat: bool) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    endpoint = "chat_completions" if chat else "completions"

    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE]
        metrics = state.metrics
        started = time.monotonic()
        status = 500
        try:
            if state.closed:
                raise RequestError(
                    503, "the server is shutting down", kind="server_error", code="shutting_down"
                )
            engine = state.engine
            if engine is None:
                raise RequestError(
                    503, "the model is still loading", kind="server_error", code="not_ready"
                )
            parsed = parse_request(
                await read_body(request, state.limits), chat, state.name, state.limits
            )
            ids = engine.prompt_ids(parsed)
            state.admission.admit()
            state.begin()
            try:
                response = await generate(request, engine, parsed, ids, metrics, started)
            finally:
                state.end()
                state.admission.release()
            status = response.status
            return response
        except RequestError as error:
            status = error.status
            metrics.error(error.code or error.kind)
            return error_response(error)
        finally:
            metrics.request(endpoint, status, time.monotonic() - started)

    return handle


async def generate(
    request: web.Request,
    engine: Engine,
    parsed: GenerationRequest,
    ids: list[int],
    metrics: Metrics,
    started: float,
) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    events, cancel = engine.start(parsed, ids, loop)
    name = served_name(request)
    stream: web.StreamResponse | None = None
    pieces: list[str] = []
    first = True
    try:
        while True:
            event = await events.get()
            if event.kind == "error":
                metrics.error("generation_failed")
                if stream is None:
                    raise RequestError(500, f"generation failed: {event.text}", kind="server_error")
                break
            if event.kind == "delta" and first:
                metrics.first_token(time.monotonic() - started)
            if parsed.stream and stream is None:
                stream = web.StreamResponse(
                    headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
                )
                await stream.prepare(request)
                await send(stream, chunk(parsed, name, None, None, first=True))
            if event.kind == "delta":
                first = False
                if stream is not None and event.text:
                    await send(stream, chunk(parsed, name, event.text, None))
                elif stream is None:
                    pieces.append(event.text)
                continue
            counts = usage(event.prompt_tokens, event.completion_tokens)
            metrics.tokens(event.prompt_tokens, event.completion_tokens)
            if stream is None:
                return web.json_response(
                    full_response(parsed, name, "".join(pieces), event.finish or "stop", counts)
                )
            await send(stream, chunk(parsed, name, None, event.finish))
            if parsed.include_usage:
                await send(stream, usage_chunk(parsed, name, counts))
            break
        assert stream is not None
        await stream.write(b"data: [DONE]\n\n")
        await stream.write_eof()
        return stream
    except (ConnectionResetError, asyncio.CancelledError):
        cancel.set()  # the client went away: stop generating for it
        raise
    finally:
        cancel.set()


async def send(stream: web.StreamResponse, body: dict[str, Any]) -> None:
    await stream.write(b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n")
