"""What the server needs from an engine: the `Engine` protocol, the `Event`s an engine reports,
the `Heartbeat` its threads keep, `encode_prompt`, the prompt checks both engines apply.
Both end an answer on `genai_model.stop_token_ids`.

Both `genai.GenAIEngine` and `batch.scheduler.BatchEngine` implement `Engine` structurally; they
share no base class, only the functions and types here and in `text`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from kubetune_trainer.serve.protocol import GenerationRequest, RequestError, TokenLogprob
from kubetune_trainer.tokenizer import ServingTokenizer


@dataclass
class Event:
    """What a worker reports: a text delta, the end (finish reason + counts), or an error."""

    kind: str  # "delta" | "done" | "error"
    text: str = ""
    finish: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """With `request.logprobs`: the tokens this delta's text (or held-back text) came from."""


class Heartbeat:
    """When each of an engine's threads last made progress, while it had work.

    A thread calls `beat()` whenever it advances (a decode step, a prefill chunk, a token) and
    `idle()` when it has nothing to do; `stalled_for()` is the longest time any busy thread has
    gone without advancing, 0 when every thread is idle or moving. Per thread, so one wedged
    worker is seen even while others advance. Written by engine threads, read by the event
    loop's `/healthz`: hence the lock.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._busy: dict[int, float] = {}  # thread ident -> when it last advanced

    def beat(self) -> None:
        with self._lock:
            self._busy[threading.get_ident()] = self.clock()

    def idle(self) -> None:
        with self._lock:
            self._busy.pop(threading.get_ident(), None)

    def stalled_for(self) -> float:
        now = self.clock()
        with self._lock:
            return max((now - last for last in self._busy.values()), default=0.0)


class Engine(Protocol):
    """A loaded model that generates for validated requests, off the event loop."""

    tokenizer: ServingTokenizer

    @property
    def running(self) -> int:
        """Requests generating now; admitted requests beyond these are waiting."""
        ...

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """The request's prompt as token ids; `RequestError` (400) if it cannot be served."""
        ...

    def start(
        self, request: GenerationRequest, ids: list[int], loop: asyncio.AbstractEventLoop
    ) -> tuple[asyncio.Queue[Event], threading.Event]:
        """Begin generating. Events arrive on the queue, put there on `loop`, and end with one
        "done" or "error"; setting the returned event cancels the generation."""
        ...

    def kv_cache_usage(self) -> float:
        """The share of the KV cache's capacity (`max_concurrency` sequences of the whole
        context) that running sequences hold, 0 to 1: what an autoscaler reads as memory
        pressure beside requests running and waiting."""
        ...

    def stalled_seconds(self) -> float:
        """How long the engine has had work without making progress: 0 when idle or
        advancing; `/healthz` fails past `Limits.engine_stall_seconds` (a wedged engine)."""
        ...

    def warm_up(self) -> float:
        """One short generation, so the first real request does not pay for set-up; seconds."""
        ...

    def shutdown(self) -> None:
        """Stop generating; in-flight work is abandoned (the server drains before this)."""
        ...


@runtime_checkable
class AdapterHost(Protocol):
    """An engine whose LoRA adapters change while it runs (`batch.scheduler.BatchEngine` built
    with branches): `adapters` maps the names requests may ask for to their loaded weights, read
    and written on the event loop only; a request keeps the weights its name had when it
    started."""

    adapters: dict[str, Any]

    def read_adapter(self, name: str, path: Path) -> Any:
        """Read and check an adapter directory (blocking: call it in a worker thread); raises
        `adapters.AdapterError`, naming why, for one this base cannot serve."""
        ...


def encode_prompt(
    tokenizer: ServingTokenizer, request: GenerationRequest, context_length: int
) -> list[int]:
    """Render and tokenize the prompt; refuse one that is empty or leaves no room for
    `max_tokens` in the context, before it takes a place in the queue."""
    try:
        if request.chat:
            assert request.messages is not None
            ids = tokenizer.encode_chat(request.messages)
        else:
            assert request.prompt is not None
            ids = tokenizer.encode(request.prompt)
    except Exception as error:  # a template may raise on a conversation it does not accept
        raise RequestError(400, f"cannot render the prompt: {error}", param="messages") from None
    if not ids:
        raise RequestError(400, "the prompt is empty", param="prompt", code="invalid_value")
    if len(ids) + request.max_tokens > context_length:
        raise RequestError(
            400,
            f"This model's maximum context length is {context_length} tokens; "
            f"the prompt has {len(ids)} and max_tokens asks for {request.max_tokens}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return ids
