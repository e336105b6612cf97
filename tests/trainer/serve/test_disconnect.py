"""A client that goes away stops its generation, streamed or not (no model needed)."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from kubetune_trainer.serve.engines.base import Event
from kubetune_trainer.serve.protocol import GenerationRequest, Limits
from kubetune_trainer.serve.server import app_runner, build_app
from kubetune_trainer.serve.state import STATE


class EndlessEngine:
    """Generates forever, one token at a time, until cancelled; records the cancellation."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.started = threading.Event()

    @property
    def running(self) -> int:
        return 0 if self.cancelled.is_set() else int(self.started.is_set())

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        return [1, 2, 3]

    def start(self, request: GenerationRequest, ids: list[int],
              loop: asyncio.AbstractEventLoop) -> tuple[asyncio.Queue[Event], threading.Event]:
        events: asyncio.Queue[Event] = asyncio.Queue()
        cancel = threading.Event()

        def work() -> None:
            self.started.set()
            while not cancel.wait(0.01):
                loop.call_soon_threadsafe(events.put_nowait, Event("delta", "x"))
            self.cancelled.set()

        threading.Thread(target=work, daemon=True).start()
        return events, cancel

    def warm_up(self) -> float:
        return 0.0

    def shutdown(self) -> None:
        pass


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_disconnected_client_cancels_its_generation(tmp_path: Path, stream: bool) -> None:
    engine = EndlessEngine()

    async def scenario() -> None:
        app = build_app(tmp_path, "m", Limits())
        app[STATE].engine = engine
        runner = app_runner(app)
        await runner.setup()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        try:
            body = {"model": "m", "prompt": "hi", "max_tokens": 1000, "stream": stream}
            url = f"http://127.0.0.1:{port}/v1/completions"
            async with httpx.AsyncClient() as client:
                if stream:  # read the first chunk, then hang up
                    async with client.stream("POST", url, json=body, timeout=30) as response:
                        async for _ in response.aiter_bytes():
                            break
                else:  # the answer would come at the end: give up waiting for it
                    with pytest.raises(httpx.ReadTimeout):
                        await client.post(url, json=body, timeout=1.0)
            # The client is gone: the engine is told to stop (bounded wait, not a timing).
            cancelled = await asyncio.to_thread(engine.cancelled.wait, 30)
            assert cancelled, "the generation went on after its client disconnected"
        finally:
            await runner.cleanup()

    asyncio.run(scenario())
