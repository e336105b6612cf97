"""Existence checks of referenced objects (Secrets, PVCs), shared by every FineTuneJob.

A burst of FineTuneJobs that name the same Secret or PVC would otherwise send one GET each.
Here concurrent checks of one object share a single request, and an object found is
remembered for a few seconds. A missing object is never remembered: a job waiting for its
Secret must see it as soon as the user creates it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

Ref = tuple[str, str, str, str]
"""(apiVersion, kind, namespace, name)."""
Lookup = Callable[[str, str, str, str], Awaitable[bool]]


class ExistenceCache:
    def __init__(
        self,
        lookup: Lookup,
        ttl_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 4096,
    ) -> None:
        self._lookup = lookup
        self._ttl = ttl_seconds
        self._clock = clock
        self._max_entries = max_entries
        self._found_until: dict[Ref, float] = {}
        self._pending: dict[Ref, asyncio.Future[bool]] = {}

    async def exists(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        ref = (api_version, kind, namespace, name)
        if self._found_until.get(ref, 0.0) > self._clock():
            return True
        pending = self._pending.get(ref)
        if pending is None:
            pending = asyncio.ensure_future(self._lookup(*ref))
            self._pending[ref] = pending
            pending.add_done_callback(lambda done: self._settle(ref, done))
        # shield: one waiter's cancellation must not cancel the lookup the others share.
        return await asyncio.shield(pending)

    def _settle(self, ref: Ref, done: asyncio.Future[bool]) -> None:
        self._pending.pop(ref, None)
        if done.cancelled() or done.exception() is not None or not done.result():
            return
        now = self._clock()
        if len(self._found_until) >= self._max_entries:
            self._found_until = {r: t for r, t in self._found_until.items() if t > now}
        self._found_until[ref] = now + self._ttl
