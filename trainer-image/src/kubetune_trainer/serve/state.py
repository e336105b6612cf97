"""What the server keeps between requests: `ServerState`, stored on the app under `STATE`, and
the `Admission` count that bounds how many requests may be generating or waiting at once.

Every field is read and written on the event loop only, so none of it needs a lock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from aiohttp import web

from kubetune_trainer.serve.engines.base import Engine
from kubetune_trainer.serve.metrics import Metrics
from kubetune_trainer.serve.protocol import Limits, RequestError

T = TypeVar("T")


class Admission:
    """At most `max_concurrency` generating plus `max_queue` waiting; the next request is
    refused (429) instead of queueing without bound."""

    def __init__(self, limits: Limits) -> None:
        self.capacity = limits.max_concurrency + limits.max_queue
        self.admitted = 0  # generating + waiting

    def admit(self, places: int = 1) -> None:
        """Reserve `places` (one per answer: `n`) or refuse with 429; the caller must
        `release(places)` when done."""
        if self.admitted + places > self.capacity:
            raise RequestError(
                429,
                "the server is at capacity; retry later",
                code="rate_limit_exceeded",
                kind="rate_limit_error",
            )
        self.admitted += places

    def release(self, places: int = 1) -> None:
        self.admitted -= places


def _set_event() -> asyncio.Event:  # idle at first: nothing is in flight
    event = asyncio.Event()
    event.set()
    return event


@dataclass
class ServerState:
    """The app's state: its configuration, the engine once loaded, and the counts that admission,
    draining and `/metrics` read."""

    name: str  # the base model's served name, as `/v1/models` lists it and requests name it
    model_dir: Path
    limits: Limits
    engine_kind: str  # "batch" | "genai"
    adapters: dict[str, Path] = field(default_factory=dict)
    """LoRA adapters served on the base now: name (what requests select) -> PEFT directory
    (changed at run time by `adapter_routes`, beside the engine's own map)."""
    runtime_lora: bool = False
    """`/v1/load_lora_adapter` and `/v1/unload_lora_adapter` may change `adapters` (else 404)."""
    adapter_changes: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held while an adapter is read and swapped in, or removed: one change at a time."""
    api_key_required: bool = False
    """Every route but the probes and `/metrics` needs the API key (the key itself stays in
    the middleware that checks it, out of this state and its repr)."""
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Metrics = field(default_factory=Metrics)
    engine: Engine | None = None  # set once loaded and warmed up: the server is ready
    error: str | None = None  # why the engine failed to load
    draining: bool = False  # SIGTERM came: /readyz says 503, requests are still served
    closed: bool = False  # the drain window is over: new requests get 503
    inflight: int = 0
    idle: asyncio.Event = field(default_factory=_set_event)  # set while `inflight` is 0
    admission: Admission = field(init=False)

    def __post_init__(self) -> None:
        self.admission = Admission(self.limits)

    @property
    def served(self) -> tuple[str, ...]:
        """The model names requests may ask for: the base, then its adapters."""
        return (self.name, *self.adapters)

    def refuse_if_closed(self) -> None:
        """503 once the drain window is over: the pod is leaving, a retry goes elsewhere."""
        if self.closed:
            raise RequestError(
                503, "the server is shutting down", kind="server_error", code="shutting_down"
            )

    @contextmanager
    def admitted(self, places: int = 1) -> Iterator[None]:
        """Hold `places` in admission (429 when they do not fit) and count the request in
        flight, for as long as the block runs. Every endpoint whose work runs in the worker
        threads goes through here (completions, `/tokenize`, `/detokenize`): they share the
        thread pool, so work admitted nowhere would queue there ahead of admitted prompts."""
        self.admission.admit(places)
        self.begin()
        try:
            yield
        finally:
            self.end()
            self.admission.release(places)

    async def run_admitted(self, work: Callable[[], T]) -> T:
        """`work` in a worker thread, holding one place in admission (429 when none is left)
        and counted in flight until the thread ends, even when the caller is cancelled first
        (its client went away): a thread cannot be stopped, and a place freed while its work
        still runs would let clients that send and disconnect queue unbounded work on the pool.
        """
        self.admission.admit()
        self.begin()

        def release(_: object) -> None:
            self.end()
            self.admission.release()

        work_done = asyncio.ensure_future(asyncio.to_thread(work))
        work_done.add_done_callback(release)
        return await asyncio.shield(work_done)

    def begin(self) -> None:
        """Count a request in flight, so that draining waits for it."""
        self.inflight += 1
        self.idle.clear()

    def end(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self.idle.set()


STATE: web.AppKey[ServerState] = web.AppKey("state", ServerState)
