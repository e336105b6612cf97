"""Losing the Lease stops every write (issue 28, item 8): the gate is a pure predicate over
the election state; the client refuses writes once it is shut, whoever sends them; a leader
that finds another holder in its Lease stops at once instead of at its renew deadline; the
progress sink sends no report it held. Requests go to a loopback HTTP server that records
what reaches it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web

from kubetune.api.dataplane import ProgressReport
from kubetune.operator.client import KubeClient, NotLeading
from kubetune.operator.leader import Election, LeaseLock, leading
from kubetune.operator.progress.sink import ProgressSink


def test_leading_holds_within_the_deadline_and_until_someone_else_holds_the_lease() -> None:
    assert not leading(Election(renewed_at=None, renew_deadline=10), now=5)  # never took it
    assert leading(Election(renewed_at=100, renew_deadline=10), now=109.9)
    assert not leading(Election(renewed_at=100, renew_deadline=10), now=110)
    assert not leading(Election(renewed_at=100, renew_deadline=10, superseded_by="b"), now=101)


@asynccontextmanager
async def loopback(seen: list[str]) -> AsyncIterator[KubeClient]:
    """A client of a loopback server that answers every request with `{}` and records it."""

    async def handler(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path}")
        return web.json_response({"metadata": {"resourceVersion": "1"}})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    client = KubeClient(f"http://127.0.0.1:{runner.addresses[0][1]}", False, None, attempts=1)
    try:
        yield client
    finally:
        await client.close()
        await runner.cleanup()


def test_a_shut_gate_refuses_writes_and_lets_reads_pass() -> None:
    seen: list[str] = []
    open_ = [True]

    async def scenario() -> None:
        async with loopback(seen) as client:
            client.write_gate = lambda: open_[0]
            await client.patch_status("ns", "job", {"phase": "Training"})
            open_[0] = False
            with pytest.raises(NotLeading):
                await client.patch_status("ns", "job", {"phase": "Training"})
            with pytest.raises(NotLeading):
                await client.apply({"apiVersion": "v1", "kind": "ConfigMap",
                                    "metadata": {"name": "c", "namespace": "ns"}})  # fmt: skip
            reviewer = client.sibling(connections=1, attempts=1)
            with pytest.raises(NotLeading):  # a sibling (the TokenReview client) shares it
                await reviewer.token_review("t", ["a"])
            await reviewer.close()
            await client.get("v1", "Pod", "ns", "p")  # reads stay: they change nothing
            ungated = client.sibling(connections=1, attempts=1, write_gate=None)
            await ungated.replace({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                   "metadata": {"name": "l", "namespace": "ns"}})  # fmt: skip
            await ungated.close()

    asyncio.run(scenario())
    assert [line.split(" ")[0] for line in seen] == ["PATCH", "GET", "PUT"]


def test_a_report_pending_when_the_lease_is_lost_is_never_sent() -> None:
    seen: list[str] = []
    open_ = [True]

    async def scenario() -> None:
        async with loopback(seen) as client:
            client.write_gate = lambda: open_[0]
            sink = ProgressSink(client, 0.3, lambda: "now", leading=lambda: open_[0])
            sink.submit(("ns", "job"), ProgressReport(step=1))  # patched at once
            while sink._tasks:
                await asyncio.sleep(0.01)
            sink.submit(("ns", "job"), ProgressReport(step=2))  # held by the rate limit
            assert sink._tasks
            open_[0] = False
            await asyncio.sleep(0.6)  # past the rate limit: it would have been sent by now
            sink.submit(("ns", "job"), ProgressReport(step=3))  # after the loss: refused
            await asyncio.sleep(0.6)

    asyncio.run(scenario())
    assert seen == ["PATCH /apis/kubetune.io/v1alpha1/namespaces/ns/finetunejobs/job/status"]


class LeaseServer:
    """The Lease as the API server holds it; `holder` is who is in it."""

    def __init__(self, holder: str) -> None:
        self.holder = holder
        self.version = 1

    async def get(self, *_: object) -> dict[str, Any]:
        return {"metadata": {"resourceVersion": str(self.version)},
                "spec": {"holderIdentity": self.holder, "renewTime": f"t{self.version}",
                         "leaseDurationSeconds": 30}}  # fmt: skip

    async def replace(self, manifest: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        self.holder = manifest["spec"]["holderIdentity"]
        return manifest


def test_another_holder_in_the_lease_ends_leadership_at_the_next_renewal() -> None:
    """Not at the renew deadline (20 s here): the other holder acts already."""
    server = LeaseServer("me")

    async def scenario() -> float:
        lock = LeaseLock(server, "ns", "l", "me", duration_seconds=30)  # type: ignore[arg-type]
        lock.renew_every = 0.05
        assert await lock.try_acquire() and lock.leading()
        holding = asyncio.create_task(lock.hold())
        await asyncio.sleep(0.2)
        assert lock.leading() and not holding.done()  # renewing
        server.holder = "usurper"
        started = time.monotonic()
        async with asyncio.timeout(5):
            await holding
        assert not lock.leading() and lock.superseded_by == "usurper"
        assert server.holder == "usurper"  # not taken back
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 1.0


def test_no_retry_or_pass_runs_once_the_lease_is_lost_and_pending_retries_are_cancelled() -> None:
    import kopf

    from kubetune.operator.handlers import reconcile_pass, retry_later, stop_delayed_work

    async def scenario() -> None:
        open_ = [True]
        # No controller: a pass that started would fail on it.
        memo = kopf.Memo(shared={"indexes": {}}, leading=lambda: open_[0], controller=None)
        retry_later(memo, ("ns", "a"))
        pending = memo.shared["retries"][("ns", "a")]
        open_[0] = False
        retry_later(memo, ("ns", "b"))
        assert ("ns", "b") not in memo.shared["retries"]
        await reconcile_pass(memo, {"metadata": {"namespace": "ns", "name": "a"}}, {})
        stop_delayed_work(memo)
        await asyncio.sleep(0)
        assert pending.cancelled() and not memo.shared["retries"]

    asyncio.run(scenario())
