"""Engines without a model, and the real app served from a thread, for the server's tests.

`EchoEngine` applies the real prompt checks (the built-in model's tokenizer and chat template
through `encode_prompt`) and "generates" by echoing the prompt's tokens through the real
`TextAssembler`: everything the server does except running a network. The others script one
behaviour each (endless, silent, wedged). `serving` runs the app with the server's own
runner on an event loop in another thread, so a test's blocking client can tell whether the
server's loop is free.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from aiohttp import web

from kubetune_trainer.serve.engines.base import Event, Heartbeat, encode_prompt
from kubetune_trainer.serve.engines.text import TextAssembler
from kubetune_trainer.serve.protocol import GenerationRequest, Limits
from kubetune_trainer.serve.server import app_runner, build_app
from kubetune_trainer.serve.state import STATE
from kubetune_trainer.tokenizer import ServingTokenizer

Report = Callable[[Event], None]


class ThreadEngine:
    """The `Engine` protocol's plumbing: each request runs `generate` in its own thread."""

    def __init__(self) -> None:
        self.heartbeat = Heartbeat()
        self.running = 0
        self.cancelled = threading.Event()  # some generation was told to stop
        self.started = threading.Event()  # some generation began

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        return [1, 2, 3]

    def start(
        self, request: GenerationRequest, ids: list[int], loop: asyncio.AbstractEventLoop
    ) -> tuple[asyncio.Queue[Event], threading.Event]:
        events: asyncio.Queue[Event] = asyncio.Queue()
        cancel = threading.Event()

        def report(event: Event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        def work() -> None:
            self.running += 1
            self.started.set()
            self.heartbeat.beat()
            try:
                self.generate(request, ids, report, cancel)
            finally:
                if cancel.is_set():
                    self.cancelled.set()
                self.heartbeat.idle()
                self.running -= 1

        threading.Thread(target=work, daemon=True).start()
        return events, cancel

    def generate(
        self, request: GenerationRequest, ids: list[int], report: Report, cancel: threading.Event
    ) -> None:
        raise NotImplementedError

    def stalled_seconds(self) -> float:
        return self.heartbeat.stalled_for()

    def kv_cache_usage(self) -> float:
        return 0.0

    def warm_up(self) -> float:
        return 0.0

    def shutdown(self) -> None:
        pass


class EchoEngine(ThreadEngine):
    """Real prompt rendering and checks; the prompt's own tokens, echoed, as the output."""

    def __init__(self, limits: Limits) -> None:
        from kubetune_trainer.builtin import builtin_model_dir

        super().__init__()
        self.limits = limits
        self.tokenizer = ServingTokenizer.load(builtin_model_dir("smollm2-135m-instruct"))

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        return encode_prompt(self.tokenizer, request, self.limits.context_length)

    def generate(
        self, request: GenerationRequest, ids: list[int], report: Report, cancel: threading.Event
    ) -> None:
        text = TextAssembler(self.tokenizer.decode, request.stop)
        generated, finish = 0, "length"
        while generated < request.max_tokens:
            if cancel.is_set():
                finish = "stop"
                break
            generated += 1
            delta = text.add(ids[generated % len(ids)])
            self.heartbeat.beat()
            report(Event("delta", text=delta, completion_tokens=generated))
            if text.stopped:
                finish = "stop"
                break
        if tail := text.flush():
            report(Event("delta", text=tail, completion_tokens=generated))
        report(Event("done", finish=finish, prompt_tokens=len(ids), completion_tokens=generated))


class EndlessEngine(ThreadEngine):
    """One "x" every 10 ms until cancelled."""

    def generate(
        self, request: GenerationRequest, ids: list[int], report: Report, cancel: threading.Event
    ) -> None:
        generated = 0
        while not cancel.wait(0.01):
            generated += 1
            self.heartbeat.beat()
            report(Event("delta", "x", completion_tokens=generated))
        report(Event("done", finish="stop", prompt_tokens=len(ids), completion_tokens=generated))


class SilentEngine(ThreadEngine):
    """Never produces a token (a long queue, or a prefill that takes for ever)."""

    def generate(
        self, request: GenerationRequest, ids: list[int], report: Report, cancel: threading.Event
    ) -> None:
        cancel.wait()
        report(Event("done", finish="stop", prompt_tokens=len(ids)))


class FailingEngine(ThreadEngine):
    """Two tokens of JSON, then the generation fails (a grammar or ONNX Runtime error)."""

    failure = "grammar: the model's next token fits no continuation"

    def generate(
        self, request: GenerationRequest, ids: list[int], report: Report, cancel: threading.Event
    ) -> None:
        report(Event("delta", '{"a"', completion_tokens=1))
        report(Event("delta", ": ", completion_tokens=2))
        report(Event("error", text=self.failure))


class WedgedEngine(ThreadEngine):
    """A step that does not return until `release` is set; the heartbeat runs on `clock`."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__()
        self.heartbeat = Heartbeat(clock)
        self.release = threading.Event()

    def generate(
        self, request: GenerationRequest, ids: list[int], report: Report, cancel: threading.Event
    ) -> None:
        self.release.wait()  # inside the step: no beat
        report(Event("delta", "x", completion_tokens=1))
        report(Event("done", finish="length", prompt_tokens=len(ids), completion_tokens=1))


def app_with(engine: object, limits: Limits, name: str = "m") -> web.Application:
    app = build_app(Path("/nonexistent"), name, limits)
    app[STATE].engine = engine  # type: ignore[assignment]
    return app


@contextmanager
def serving(app: web.Application) -> Iterator[str]:
    """Serve `app` with the server's runner on 127.0.0.1 from another thread; its base URL."""
    loop = asyncio.new_event_loop()
    runner = app_runner(app)
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=run, name="test-server", daemon=True)
    thread.start()
    assert ready.wait(30), "the test server did not start"
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
