"""One active operator at a time: a coordination.k8s.io Lease, like client-go's leader election.

Why not kopf's peering: it needs its own cluster-wide CRDs, and two operators of equal
priority both pause with a warning. A Lease is the Kubernetes-native lock: the holder renews
it every `renew_seconds`; another instance takes it over only after it went unrenewed for
`duration_seconds` as measured on its own clock (no trust in clock sync). A holder that cannot
renew in time stops acting (the process exits and its pod restarts as a candidate).

While it leads, every write the operator sends passes one gate, `leading(election, now)`: it
holds for as long as the last renewal is within `renew_deadline` and no other holder has been
seen in the Lease. Another identity in the Lease ends leadership at once (that holder acts
already; waiting out the deadline would make two writers), and the client refuses every
write from then on (`kubetune.operator.client.NotLeading`), whatever sends it: a handler, a
delayed retry, the progress sink.

The holder's deadline is `renew_deadline` (2/3 of the lease, client-go's 10 s of 15 s), counted
from the *start* of its last successful renewal, and every renewal attempt is cut off at that
deadline: the client's own retries could otherwise hold one renewal for minutes, long after a
candidate took the Lease over. A candidate takes over no sooner than `duration_seconds` after it
first saw that renewal, which is later than the renewal's start, so the old holder has stopped
before the new one starts.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from dataclasses import dataclass
from typing import Any

from kubetune.operator.client import ApiError, KubeClient

log = logging.getLogger(__name__)


def _micro_time() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Election:
    """What this process knows of its leadership."""

    renewed_at: float | None
    """Monotonic start of the last attempt that took or renewed the Lease (None: never)."""
    renew_deadline: float
    """Seconds after `renewed_at` within which the next renewal must have succeeded."""
    superseded_by: str | None = None
    """Another identity seen holding the Lease since this process took it."""


def leading(election: Election, now: float) -> bool:
    """Whether this process may write at monotonic time `now`: it took or renewed the Lease
    less than the renew deadline ago, and has seen nobody else hold it since. Pure."""
    return (
        election.superseded_by is None
        and election.renewed_at is not None
        and now - election.renewed_at < election.renew_deadline
    )


class LeaseLock:
    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        name: str,
        identity: str,
        duration_seconds: int = 15,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.duration = duration_seconds
        self.renew_every = max(1.0, duration_seconds / 3)
        self.renew_deadline = duration_seconds * 2 / 3
        self._seen: tuple[Any, float] | None = None  # (holder's renewTime, when we saw it)
        self.renewed_at: float | None = None
        """Monotonic start time of the last attempt that took or renewed the Lease."""
        self.superseded_by: str | None = None
        """Who holds the Lease now, once a renewal found someone else in it."""

    @property
    def election(self) -> Election:
        return Election(self.renewed_at, self.renew_deadline, self.superseded_by)

    def leading(self) -> bool:
        """The write gate: `leading` over this lock's state, now."""
        return leading(self.election, time.monotonic())

    def _manifest(self, current: dict[str, Any] | None, transitions: int) -> dict[str, Any]:
        now = _micro_time()
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.duration,
            "renewTime": now,
            "acquireTime": now,
            "leaseTransitions": transitions,
        }
        if current and current.get("spec", {}).get("holderIdentity") == self.identity:
            spec["acquireTime"] = current["spec"].get("acquireTime", now)
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if current:
            metadata["resourceVersion"] = current["metadata"]["resourceVersion"]
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": spec,
        }

    def _expired(self, lease: dict[str, Any]) -> bool:
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity")
        if not holder or holder == self.identity:
            return True
        renew = spec.get("renewTime")
        now = time.monotonic()
        if self._seen is None or self._seen[0] != renew:
            self._seen = (renew, now)  # first sight of this renewal: the holder is alive
            return False
        return now - self._seen[1] > int(spec.get("leaseDurationSeconds") or self.duration)

    async def try_acquire(self) -> bool:
        """One attempt to take or renew the Lease."""
        started = time.monotonic()
        if await self._attempt():
            self.renewed_at = started
            return True
        return False

    async def _attempt(self) -> bool:
        try:
            lease = await self.client.get(
                "coordination.k8s.io/v1", "Lease", self.namespace, self.name
            )
            if lease is None:
                await self.client.create(self._manifest(None, 0))
                return True
            holder = (lease.get("spec") or {}).get("holderIdentity")
            if self.renewed_at is not None and holder and holder != self.identity:
                # Someone else took it while this process held it: it is theirs from now,
                # expired or not; taking it back would make two writers in turn.
                if self.superseded_by is None:
                    log.error("lease %s/%s is held by %s now", self.namespace, self.name, holder)
                self.superseded_by = holder
                return False
            if not self._expired(lease):
                return False
            transitions = int(lease.get("spec", {}).get("leaseTransitions") or 0)
            if lease.get("spec", {}).get("holderIdentity") != self.identity:
                transitions += 1
            await self.client.replace(self._manifest(lease, transitions))
            return True
        except ApiError as error:
            if error.status == 409:  # another candidate wrote first
                return False
            log.warning("lease %s/%s: %s", self.namespace, self.name, error)
            return False

    async def acquire(self) -> None:
        logged = False
        while not await self.try_acquire():
            if not logged:
                log.info("another operator holds lease %s/%s; waiting", self.namespace, self.name)
                logged = True
            await asyncio.sleep(self.renew_every)  # polling a lock held elsewhere
        log.info("acquired lease %s/%s as %s", self.namespace, self.name, self.identity)

    async def hold(self) -> None:
        """Renew until `renew_deadline` has passed since the last renewal began; then return.

        An attempt that hangs (a stalled API server, the client retrying) is cancelled at the
        deadline, so this returns on time however the API server behaves."""
        while True:
            await asyncio.sleep(self.renew_every)
            last_ok = self.renewed_at if self.renewed_at is not None else time.monotonic()
            remaining = last_ok + self.renew_deadline - time.monotonic()
            if remaining > 0:
                try:
                    async with asyncio.timeout(remaining):
                        if await self.try_acquire():
                            continue
                except TimeoutError:
                    log.warning("lease %s/%s: renewal timed out", self.namespace, self.name)
            if self.superseded_by is not None:
                log.error("lost lease %s/%s to %s; stopping", self.namespace, self.name,
                          self.superseded_by)  # fmt: skip
                return
            if time.monotonic() - last_ok >= self.renew_deadline:
                log.error("lost lease %s/%s; stopping", self.namespace, self.name)
                return

    async def release(self) -> None:
        """Give the Lease up on a clean exit, so a successor need not wait for it to expire."""
        try:
            lease = await self.client.get(
                "coordination.k8s.io/v1", "Lease", self.namespace, self.name
            )
            if lease and lease.get("spec", {}).get("holderIdentity") == self.identity:
                lease["spec"]["holderIdentity"] = None
                await self.client.replace(lease)
        except ApiError as error:
            log.warning("could not release lease: %s", error)
