"""The progress sink: rate-limited status patches of accepted reports, and the FineTuneJob
lookups the endpoint checks a report's generation against."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from kubetune.api import API_VERSION, KIND
from kubetune.api.dataplane import ProgressReport
from kubetune.operator.client import ApiError, KubeClient, NotLeading
from kubetune.operator.progress.binding import Binding, Refused, check_current
from kubetune.operator.progress.status import progress_patch

log = logging.getLogger(__name__)

FineTuneJobLookup = Callable[[str, str], Awaitable[Mapping[str, Any] | None]]
"""(namespace, name) -> the FineTuneJob's body, or None when it does not exist."""


class ProgressSink:
    """Rate-limited status patches: at most one per FineTuneJob every `min_interval` s.

    With `finetunejobs`, a report's binding is checked again just before its patch: a report
    accepted from a generation that has been replaced since is dropped, not written over the
    new generation's progress."""

    def __init__(
        self,
        client: KubeClient,
        min_interval: float,
        clock: Callable[[], str],
        on_patched: Callable[[tuple[str, str], Any], None] | None = None,
        finetunejobs: FineTuneJobLookup | None = None,
        leading: Callable[[], bool] | None = None,
    ) -> None:
        self.client = client
        self.leading = leading or (lambda: True)
        """The operator's write gate: no report is taken, held or patched while it is shut
        (another operator holds the Lease)."""
        self.min_interval = min_interval
        self.clock = clock
        self.on_patched = on_patched
        self.finetunejobs = finetunejobs
        self._last: dict[tuple[str, str], float] = {}
        self._pending: dict[tuple[str, str], tuple[ProgressReport, Binding | None]] = {}
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.patches = 0
        self.dropped = 0

    def submit(
        self, key: tuple[str, str], report: ProgressReport, binding: Binding | None = None
    ) -> None:
        if not self.leading():
            return
        self._pending[key] = (report, binding)
        if key not in self._tasks:
            wait = max(0.0, self._last.get(key, 0.0) + self.min_interval - time.monotonic())
            self._tasks[key] = asyncio.create_task(self._flush(key, wait))

    async def _flush(self, key: tuple[str, str], wait: float) -> None:
        try:
            await asyncio.sleep(wait)  # the rate limit itself, not a wait for a condition
            report, binding = self._pending.pop(key)
            if not self.leading():
                return
            if binding is not None and self.finetunejobs is not None:
                try:
                    check_current(binding, await self.finetunejobs(*key))
                except Refused as refused:
                    self.dropped += 1
                    log.info("progress of %s/%s dropped: %s", *key, refused)
                    return
            self._last[key] = time.monotonic()
            generation = binding.generation if binding is not None else None
            result = await self.client.patch_status(
                key[0], key[1], progress_patch(report, self.clock(), generation)
            )
            self.patches += 1
            if self.on_patched is not None and result is not None:
                self.on_patched(key, result)
        except ApiError as error:
            log.warning("progress of %s/%s not saved: %s", *key, error)
        except NotLeading:
            log.info("progress of %s/%s dropped: the Lease is lost", *key)
        except Exception:  # a task's exception is otherwise lost unseen
            log.exception("progress of %s/%s not saved", *key)
        finally:
            self._tasks.pop(key, None)
            if key in self._pending and self.leading():
                # A report arrived while this patch was in flight: send it too, after the
                # interval (the newest report always lands, not only the one before it).
                self._tasks[key] = asyncio.create_task(self._flush(key, self.min_interval))

    def close(self) -> None:
        """The Lease is lost: cancel every pending patch, keep nothing to send."""
        for key in list(self._tasks):
            self.forget(key)
        self._pending.clear()

    def forget(self, key: tuple[str, str]) -> None:
        task = self._tasks.pop(key, None)
        if task is not None:
            task.cancel()
        self._pending.pop(key, None)
        self._last.pop(key, None)


def api_lookup(client: KubeClient) -> FineTuneJobLookup:
    """FineTuneJobs read from the API server, one request each (a list by name: the
    operator may list and watch FineTuneJobs, not get them)."""

    async def lookup(namespace: str, name: str) -> Mapping[str, Any] | None:
        found: Mapping[str, Any] | None = await client.find(API_VERSION, KIND, namespace, name)
        return found

    return lookup


def index_lookup(shared: Mapping[str, Any], fallback: FineTuneJobLookup) -> FineTuneJobLookup:
    """FineTuneJobs from kopf's `finetunejobs` index (kept in `memo.shared` by the handlers),
    read for free on every report; `fallback` (a GET) before the index exists or when it
    does not hold the job yet (a watch event still on its way)."""

    async def lookup(namespace: str, name: str) -> Mapping[str, Any] | None:
        indexes = shared.get("indexes")
        if indexes is not None:
            bodies = list(indexes["finetunejobs"].get((namespace, name)) or ())
            if bodies:
                found: Mapping[str, Any] = bodies[0]
                return found
        return await fallback(namespace, name)

    return lookup
