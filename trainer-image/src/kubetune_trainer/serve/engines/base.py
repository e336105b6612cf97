"""What the server needs from an engine: the `Engine` protocol, the `Event`s an engine reports,
and `encode_prompt`, the prompt checks both engines apply before a request is admitted.

Both `genai.GenAIEngine` and `batch.scheduler.BatchEngine` implement `Engine` structurally; they
share no base class, only the functions and types here and in `text`.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Protocol

from kubetune_trainer.serve.protocol import GenerationRequest, RequestError
from kubetune_trainer.tokenizer import ServingTokenizer


@dataclass
class Event:
    """What a worker reports: a text delta, the end (finish reason + counts), or an error."""

    kind: str  # "delta" | "done" | "error"
    text: str = ""
    finish: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Engine(Protocol):
    """A loaded model that generates for validated requests, off the event loop."""

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

    def warm_up(self) -> float:
        """One short generation, so the first real request does not pay for set-up; seconds."""
        ...

    def shutdown(self) -> None:
        """Stop generating; in-flight work is abandoned (the server drains before this)."""
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
