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
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from aiohttp import web

from kubetune_trainer.serve.engines.base import Engine, Event
from kubetune_trainer.serve.http import error_response, read_body
from kubetune_trainer.serve.metrics import Metrics
from kubetune_trainer.serve.protocol import (
    Choice,
    GenerationRequest,
    Limits,
    RequestError,
    chunk,
    full_response,
    generation_failed,
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
            state.refuse_if_closed()
            engine = state.engine
            if engine is None:
                raise RequestError(
                    503, "the model is still loading", kind="server_error", code="not_ready"
                )
            parsed = parse_request(
                await read_body(request, state.limits), chat, state.served, state.limits
            )
            with state.admitted(parsed.n):
                ids = await prompt_ids(engine, parsed, started, state.limits)
                response = await generate(
                    request, engine, parsed, ids, metrics, started, state.limits
                )
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


@dataclass
class _Answer:
    """One of the `n` generations behind a request, as the handler follows it."""

    events: asyncio.Queue[Event]
    cancel: threading.Event
    last_token: float  # when its last tokens arrived
    choice: Choice = field(default_factory=Choice)
    generated: int = 0
    offset: int = 0  # characters of its tokens reported so far (completions' text_offset)
    first: bool = True
    prompt_tokens: int = 0


def seeded(parsed: GenerationRequest, index: int) -> GenerationRequest:
    """The request for answer `index` of `n`: its own seed, so sampled answers differ while a
    seeded request stays reproducible."""
    if parsed.seed is None or index == 0:
        return parsed
    return replace(parsed, seed=(parsed.seed + index) % 2**63)


async def _forward(index: int, answer: _Answer, merged: asyncio.Queue[tuple[int, Event]]) -> None:
    while True:
        event = await answer.events.get()
        merged.put_nowait((index, event))
        if event.kind != "delta":
            return


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
    answers = [
        _Answer(*engine.start(seeded(parsed, index), ids, loop), last_token=started)
        for index in range(parsed.n)
    ]
    merged: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    forwarders = [
        asyncio.create_task(_forward(index, answer, merged)) for index, answer in enumerate(answers)
    ]
    stream: web.StreamResponse | None = None
    unfinished = len(answers)
    failure: RequestError | None = None  # a generation failed after the stream had begun
    try:
        while unfinished:
            try:
                arrivals = [await asyncio.wait_for(merged.get(), deadline - time.monotonic())]
            except TimeoutError:
                for answer in answers:
                    answer.cancel.set()  # the engine frees the slots at its next step
                nothing_yet = all(answer.first for answer in answers)
                if timed_out(nothing_yet, stream is not None) == "error":
                    raise timeout_error(limits.request_timeout_seconds) from None
                metrics.error("request_timeout")
                arrivals = [
                    (
                        i,
                        Event(
                            "done",
                            finish="length",
                            prompt_tokens=len(ids),
                            completion_tokens=a.generated,
                        ),
                    )
                    for i, a in enumerate(answers)
                    if a.choice.finish is None
                ]
            for index, event in arrivals:
                answer = answers[index]
                if event.kind == "error":
                    if stream is None:  # nothing sent yet: a 500 (the handler counts it)
                        raise generation_failed(event.text)
                    metrics.error("generation_failed")
                    failure = generation_failed(event.text)
                    unfinished = 0  # the stream ends here, as for one answer
                    break
                if event.kind == "delta":
                    now = time.monotonic()
                    if all(a.first for a in answers):  # the request's first token: TTFT
                        metrics.first_token(now - started)
                    if not answer.first and event.completion_tokens > answer.generated:
                        metrics.between_tokens(
                            now - answer.last_token, event.completion_tokens - answer.generated
                        )
                    answer.last_token = now
                if parsed.stream and stream is None:
                    stream = web.StreamResponse(
                        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
                    )
                    await stream.prepare(request)
                    for i in range(len(answers)):
                        await send(stream, chunk(parsed, None, None, first=True, index=i))
                if event.kind == "delta":
                    answer.first = False
                    answer.generated = event.completion_tokens
                    if stream is not None and (event.text or event.logprobs):
                        body = chunk(
                            parsed,
                            event.text,
                            None,
                            logprobs=event.logprobs,
                            offset=answer.offset,
                            index=index,
                        )
                        await send(stream, body)
                    elif stream is None:
                        answer.choice.text += event.text
                        answer.choice.logprobs.extend(event.logprobs)
                    answer.offset += sum(len(e.chosen.token) for e in event.logprobs)
                    continue
                answer.choice.finish = event.finish or "stop"
                answer.generated = event.completion_tokens
                answer.prompt_tokens = event.prompt_tokens
                unfinished -= 1
                if stream is not None:
                    await send(stream, chunk(parsed, None, answer.choice.finish, index=index))
        # The prompt is billed once, as OpenAI bills it, however many answers it had.
        prompt_tokens = max(answer.prompt_tokens for answer in answers)
        counts = usage(prompt_tokens, sum(answer.generated for answer in answers))
        metrics.tokens(parsed.model, prompt_tokens, counts["completion_tokens"])
        if stream is None:
            choices = [answer.choice for answer in answers]
            return web.json_response(full_response(parsed, choices, counts))
        if failure is not None:
            # The 200 is long sent, so the failure goes in the stream, as vLLM sends it:
            # an event in OpenAI's error shape, which OpenAI's clients raise on, so the text
            # so far is not taken for a complete answer (no finish_reason, no usage follow).
            await send(stream, failure.body())
        elif parsed.include_usage:
            await send(stream, usage_chunk(parsed, counts))
        await stream.write(b"data: [DONE]\n\n")
        await stream.write_eof()
        return stream
    finally:
        # Done, failed, timed out, or the client went away: stop generating for it.
        for answer in answers:
            answer.cancel.set()
        for forwarder in forwarders:
            forwarder.cancel()


async def send(stream: web.StreamResponse, body: dict[str, Any]) -> None:
    await stream.write(b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n")
