"""Two lanes for the operator's writes: critical first, the rest when the critical lane is idle.

A new FineTuneJob needs several writes (training Job, ConfigMap, rendezvous Service, status,
an Event), but what its user waits for is one of them: the training Job, which starts the
training. Sent all at once, the writes of a burst of 200 jobs interleave at the API server and
every Job lands near the end of the burst. So the critical writes go first, and the others
wait until no critical write is in flight, or at most `max_wait_seconds`, so nothing starves
under a steady stream of new jobs. At most `deferred_in_flight` deferred writes are in flight
at once: a backlog released all together would queue the next critical writes behind it.
The ConfigMap arriving a moment after its Job is harmless: a pod that starts before its
ConfigMap exists waits for it (the kubelet retries the mount).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class Lanes:
    def __init__(self, max_wait_seconds: float = 5.0, deferred_in_flight: int = 8) -> None:
        self.max_wait_seconds = max_wait_seconds
        self._deferred_slots = asyncio.Semaphore(deferred_in_flight)
        self._critical_in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def critical_in_flight(self) -> int:
        return self._critical_in_flight

    @contextlib.asynccontextmanager
    async def critical(self) -> AsyncIterator[None]:
        self._critical_in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._critical_in_flight -= 1
            if self._critical_in_flight == 0:
                self._idle.set()

    @contextlib.asynccontextmanager
    async def deferred(self) -> AsyncIterator[None]:
        """A deferred write: after `wait_turn`, holding one of the deferred slots."""
        await self.wait_turn()
        async with self._deferred_slots:
            yield

    async def wait_turn(self) -> None:
        """Return when no critical write is in flight, or after `max_wait_seconds`."""
        if self._idle.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.max_wait_seconds)
