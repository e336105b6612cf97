"""The OpenAI wire format: the server's limits, its error, a validated request, and the
response bodies built from them, as pure functions.

Request validation lives in `requests`; these are the types that the server and both engines
share, and the bodies the server sends back. A `RequestError` carries OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Limits:
    """Server limits, from flags or `KUBETUNE_SERVE_*` environment variables."""

    max_body_bytes: int = 1 << 20
    max_tokens: int = 1024
    default_max_tokens: int = 256
    context_length: int = 8192
    max_concurrency: int = 2
    max_queue: int = 16
    grace_seconds: float = 30.0
    drain_seconds: float = 0.0
    """After SIGTERM, how long new requests are still served while `/readyz` says 503: the
    time the Service's endpoints take to drop a terminating pod (0 locally, set in pods)."""
    request_timeout_seconds: float = 600.0
    """The most a request may take, from arrival to its last token: past it, generation is
    cancelled (its slot freed) and the client gets what was generated, `finish_reason:
    "length"`, or a 504 if nothing was (`completions.timed_out`). 1024 tokens take minutes on
    a 2-core CPU, so the default is a backstop against a request that would hold a slot for
    ever, not a latency target."""
    engine_stall_seconds: float = 120.0
    """How long the engine may have work without advancing (one decode step, one prefill
    chunk) before `/healthz` says 503 and the kubelet restarts the pod: generous, a long
    prefill chunk on a slow CPU takes seconds."""


class RequestError(Exception):
    """A request the server will not serve: the HTTP status, and OpenAI's error type, message,
    param and code; 4xx for the client's mistakes, 5xx for the server's."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status,
            message,
            param,
            code,
            kind,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request: what the engine needs, and how to shape the answer."""

    model: str
    """The served model it asked for: the base model's name, or one of its LoRA adapters'."""
    chat: bool
    messages: list[dict[str, str]] | None
    prompt: str | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    grammar: str | None = None
    """The llguidance grammar the answer must follow (`response_format`), or None."""
    n: int = 1
    """How many answers to generate for the prompt (each its own sequence)."""
    logprobs: int | None = None
    """Report each generated token's log-probability and this many top alternatives; None:
    no log-probabilities (chat's `logprobs` + `top_logprobs`, completions' `logprobs`)."""
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass(frozen=True)
class Alternative:
    """A token as `logprobs` reports it: its text, its bytes (a token may end inside a
    character), and its log-probability under the model."""

    token: str
    bytes: list[int]
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the most likely tokens at its position."""

    chosen: Alternative
    top: list[Alternative]


@dataclass(frozen=True)
class TokenizeRequest:
    """`/tokenize`: a prompt, or a conversation rendered by the chat template, tokenized as
    the completion endpoints tokenize it (with the defaults)."""

    messages: list[dict[str, str]] | None
    prompt: str | None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


def timeout_error(seconds: float) -> RequestError:
    """The request ran out of time before anything was generated. A server error, not the
    client's: a retry may land on a less busy replica."""
    return RequestError(
        504,
        f"the request did not finish within the server's {seconds:g}s time limit",
        kind="server_error",
        code="request_timeout",
    )


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _envelope(request: GenerationRequest, chunk: bool) -> dict[str, Any]:
    if request.chat:
        kind = "chat.completion.chunk" if chunk else "chat.completion"
        prefix = "chatcmpl-"
    else:
        kind, prefix = "text_completion", "cmpl-"
    return {
        "id": prefix + request.request_id,
        "object": kind,
        "created": request.created,
        "model": request.model,
    }


def _alternative(alternative: Alternative) -> dict[str, Any]:
    return {
        "token": alternative.token,
        "logprob": alternative.logprob,
        "bytes": alternative.bytes,
    }


def logprobs_body(
    request: GenerationRequest, entries: list[TokenLogprob], offset: int
) -> dict[str, Any] | None:
    """A choice's `logprobs`: chat's `content` list, or the completions API's parallel lists
    (`text_offset` counts characters from `offset`, where these tokens' text begins)."""
    if request.logprobs is None:
        return None
    if request.chat:
        content = [
            {**_alternative(e.chosen), "top_logprobs": [_alternative(a) for a in e.top]}
            for e in entries
        ]
        return {"content": content, "refusal": None}
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.chosen.token)
    return {
        "tokens": [e.chosen.token for e in entries],
        "token_logprobs": [e.chosen.logprob for e in entries],
        "top_logprobs": [{a.token: a.logprob for a in e.top} for e in entries],
        "text_offset": offsets,
    }


@dataclass
class Choice:
    """One of a request's `n` answers, as it accumulates: its text so far, its tokens'
    log-probabilities (with `logprobs`), and how it ended (None while generating)."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: str | None = None


def full_response(
    request: GenerationRequest, choices: list[Choice], counts: dict[str, int]
) -> dict[str, Any]:
    body = _envelope(request, chunk=False)
    bodies = []
    for index, answer in enumerate(choices):
        if request.chat:
            choice: dict[str, Any] = {
                "index": index,
                "message": {"role": "assistant", "content": answer.text},
            }
        else:
            choice = {"index": index, "text": answer.text}
        choice.update(
            finish_reason=answer.finish or "stop",
            logprobs=logprobs_body(request, answer.logprobs, 0),
        )
        bodies.append(choice)
    body.update(choices=bodies, usage=counts)
    return body


def chunk(
    request: GenerationRequest,
    text: str | None,
    finish: str | None,
    first: bool = False,
    logprobs: list[TokenLogprob] | None = None,
    offset: int = 0,
    index: int = 0,
) -> dict[str, Any]:
    """A stream chunk of choice `index`; `logprobs` are its tokens' (their text begins at
    `offset` in that choice's text)."""
    body = _envelope(request, chunk=True)
    if request.chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        choice: dict[str, Any] = {"index": index, "delta": delta}
    else:
        choice = {"index": index, "text": text or ""}
    entries = logprobs_body(request, logprobs, offset) if logprobs else None
    choice.update(finish_reason=finish, logprobs=entries)
    body["choices"] = [choice]
    return body


def usage_chunk(request: GenerationRequest, counts: dict[str, int]) -> dict[str, Any]:
    body = _envelope(request, chunk=True)
    body.update(choices=[], usage=counts)
    return body


def generation_failed(reason: str) -> RequestError:
    """The engine failed mid-generation (ONNX Runtime raised, the grammar admits no token): the
    server's fault. A 500 before anything was sent; after, the error event that ends a stream."""
    return RequestError(
        500, f"generation failed: {reason}", kind="server_error", code="generation_failed"
    )
