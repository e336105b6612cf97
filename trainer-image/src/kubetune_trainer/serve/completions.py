"""The `/v1/completions` and `/v1/chat/completions` handlers: admission, then one generation
answered as a JSON body or as a server-sent event stream.

Separate from the app wiring and the small endpoints because this is where a request meets an
engine: admission and release, the in-flight count that draining waits on, the prompt's
tokenization in a thread, and the event loop that turns engine events into chunks, with
cancellation when the client goes away or the request's time limit passes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from kubetune_trainer.serve.engines.base import Engine, Event
from kubetune_trainer.serve.http import error_response, read_body, served_name
from kubetune_trainer.serve.metrics import Metrics
from kubetune_trainer.serve.protocol import (
    GenerationRequest,
    Limits,
    RequestError,
    chunk,
    full_response,
    timeout_error,
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
            state.admission.admit()
            state.begin()
            try:
                ids = await prompt_ids(engine, parsed, started, state.limits)
                response = await generate(
                    request, engine, parsed, ids, metrics, started, state.limits
                )
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


async def prompt_ids(
    engine: Engine, parsed: GenerationRequest, started: float, limits: Limits
) -> list[int]:
    """Render and tokenize in a worker thread: a big prompt or a slow chat template takes
    seconds of CPU, which on the event loop would stall every stream, probe and request.
    Called after admission, so at most `capacity` prompts are being tokenized at once and a
    request over capacity is refused before it costs any CPU."""
    try:
        return await asyncio.wait_for(
            asyncio.to_thread(engine.prompt_ids, parsed),
            started + limits.request_timeout_seconds - time.monotonic(),
        )
    except TimeoutError:
        raise timeout_error(limits.request_timeout_seconds) from None


def timed_out(first: bool, stream_started: bool) -> str:
    """What a request that runs out of time gets: "error" (a 504) if the client has received
    nothing yet, else "length": the text so far, ended as if `max_tokens` were reached.

    Why not always an error: a stream's 200 is already sent, and OpenAI's clients retry 5xx
    answers, which would rerun a generation that already took the whole budget; "length" is
    what they already handle for a cut-off answer, and the tokens generated are not wasted.
    """
    return "error" if first and not stream_started else "length"


async def generate(
    request: web.Request,
    engine: Engine,
    parsed: GenerationRequest,
    ids: list[int],
    metrics: Metrics,
    started: float,
    limits: Limits,
) -> web.StreamResponse:
    deadline = started + limits.request_timeout_seconds
    loop = asyncio.get_running_loop()
    events, cancel = engine.start(parsed, ids, loop)
    name = served_name(request)
    stream: web.StreamResponse | None = None
    pieces: list[str] = []
    first = True
    generated = 0
    last_token = started  # when the last tokens arrived
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), deadline - time.monotonic())
            except TimeoutError:
                cancel.set()  # the engine frees the request's slot at its next step
                if timed_out(first, stream is not None) == "error":
                    raise timeout_error(limits.request_timeout_seconds) from None
                metrics.error("request_timeout")
                event = Event(
                    "done", finish="length", prompt_tokens=len(ids), completion_tokens=generated
                )
            if event.kind == "error":
                metrics.error("generation_failed")
                if stream is None:
                    raise RequestError(500, f"generation failed: {event.text}", kind="server_error")
                break
            if event.kind == "delta":
                now = time.monotonic()
                if first:
                    metrics.first_token(now - started)
                elif event.completion_tokens > generated:
                    metrics.between_tokens(now - last_token, event.completion_tokens - generated)
                last_token = now
            if parsed.stream and stream is None:
                stream = web.StreamResponse(
                    headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
                )
                await stream.prepare(request)
                await send(stream, chunk(parsed, name, None, None, first=True))
            if event.kind == "delta":
                first = False
                generated = event.completion_tokens
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
