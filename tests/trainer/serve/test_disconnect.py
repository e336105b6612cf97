"""A client that goes away stops its generation, streamed or not (no model needed)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from kubetune_trainer.serve.protocol import Limits
from kubetune_trainer.serve.server import app_runner, build_app
from kubetune_trainer.serve.state import STATE
from tests.trainer.serve.fakes import EndlessEngine


async def generating(engine: EndlessEngine) -> None:
    """Wait until the engine runs the request: a client that hangs up sooner (a loaded
    machine can be slower than any fixed timeout) has no generation to cancel."""
    started = await asyncio.to_thread(engine.started.wait, 30)
    assert started, "the request never reached the engine"


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
                        await generating(engine)
                else:  # the answer would come at the end: give up waiting for it
                    request = asyncio.create_task(client.post(url, json=body, timeout=30))
                    await generating(engine)
                    request.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await request
            # The client is gone: the engine is told to stop (bounded wait, not a timing).
            cancelled = await asyncio.to_thread(engine.cancelled.wait, 30)
            assert cancelled, "the generation went on after its client disconnected"
        finally:
            await runner.cleanup()

    asyncio.run(scenario())
