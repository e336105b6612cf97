"""The batch engine's outbox: events reach their event loops, and a flush that waits returns
once the loop has taken them (the first-token handoff), never hanging on a loop that is gone."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from kubetune_trainer.serve.engines.base import Event
from kubetune_trainer.serve.engines.batch.sequences import Outbox, Sequence
from kubetune_trainer.serve.engines.text import TextAssembler
from tests.trainer.serve.test_serve_batch import request


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    running = asyncio.new_event_loop()
    thread = threading.Thread(target=running.run_forever, daemon=True)
    thread.start()
    yield running
    running.call_soon_threadsafe(running.stop)
    thread.join(5)
    running.close()


def sequence(loop: asyncio.AbstractEventLoop) -> Sequence:
    return Sequence(
        request("hi", 4),
        [1],
        asyncio.Queue(),
        loop,
        threading.Event(),
        TextAssembler(lambda ids: "", ()),
        np.random.default_rng(0),
    )


def test_a_waiting_flush_returns_after_the_loop_has_taken_the_events(
    loop: asyncio.AbstractEventLoop,
) -> None:
    outbox = Outbox()
    first = sequence(loop)
    # The loop is busy for a moment: an unwaited flush would return before delivery.
    loop.call_soon_threadsafe(time.sleep, 0.2)
    outbox.report(first, Event("delta", text="a"))
    outbox.flush(wait=2.0)
    assert first.events.qsize() == 1


def test_a_waiting_flush_gives_up_after_its_wait(loop: asyncio.AbstractEventLoop) -> None:
    outbox = Outbox()
    first = sequence(loop)
    loop.call_soon_threadsafe(time.sleep, 1.0)
    outbox.report(first, Event("delta", text="a"))
    outbox.flush(wait=0.05)
    assert first.events.qsize() == 0  # back before the busy loop took it: it gave up


def test_a_flush_to_a_closed_loop_drops_its_events(loop: asyncio.AbstractEventLoop) -> None:
    closed = asyncio.new_event_loop()
    closed.close()
    outbox = Outbox()
    gone, alive = sequence(closed), sequence(loop)
    outbox.report(gone, Event("delta", text="a"))
    outbox.report(alive, Event("delta", text="b"))
    outbox.flush(wait=2.0)
    assert gone.events.qsize() == 0 and alive.events.qsize() == 1 and not outbox.items
