"""Leader election against the real API server: a leader whose API server stalls steps down
before a candidate takes the Lease over (issue 13, finding 11).

The leader talks to the API server through a TCP proxy that this test can freeze: frozen, it
keeps the leader's connections open and forwards nothing, the way a wedged load balancer or a
partitioned node looks to a client. Without a deadline on renewals, the client's own retries
(5 attempts, 30 s each) hold one renewal for minutes while the candidate takes over after one
lease duration; with it, the leader gives up first.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from cluster import Cluster

from kubetune.operator.client import KubeClient
from kubetune.operator.leader import LeaseLock

LEASE_SECONDS = 3


class FreezableProxy:
    """Forwards TCP to `target` until frozen; frozen, it reads and drops, answering nothing."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.frozen = asyncio.Event()
        self.server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if self.frozen.is_set():
                    continue  # swallowed: the other side waits for an answer that never comes
                writer.write(data)
                await writer.drain()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.frozen.is_set():
            await reader.read()  # a new connection while frozen: accept it, never answer
            return
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        await asyncio.gather(
            self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer)
        )
        for stream in (writer, upstream_writer):
            stream.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[FreezableProxy]:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        try:
            yield self
        finally:
            self.server.close()


def test_a_stalled_leader_steps_down_before_a_candidate_takes_over(cluster: Cluster) -> None:
    cluster.kubectl("create", "namespace", "leases", check=False)
    name = f"leader-{uuid.uuid4().hex[:6]}"
    api = urlsplit(cluster.server)
    assert api.hostname is not None and api.port is not None

    async def scenario() -> tuple[float, float]:
        async with FreezableProxy(api.hostname, api.port).running() as proxy:
            through_proxy = KubeClient.connect(str(cluster.kubeconfig))
            through_proxy.server = f"https://127.0.0.1:{proxy.port}"
            direct = KubeClient.connect(str(cluster.kubeconfig))
            leader = LeaseLock(through_proxy, "leases", name, "leader", LEASE_SECONDS)
            candidate = LeaseLock(direct, "leases", name, "candidate", LEASE_SECONDS)
            try:
                await leader.acquire()
                holding = asyncio.create_task(leader.hold())
                assert not await candidate.try_acquire()  # a live leader keeps the Lease
                await asyncio.sleep(LEASE_SECONDS)  # it renews through the proxy meanwhile
                assert not await candidate.try_acquire()
                assert not holding.done()

                proxy.frozen.set()
                stepped_down = taken_over = None
                async with asyncio.timeout(120):
                    while stepped_down is None or taken_over is None:
                        if stepped_down is None and holding.done():
                            stepped_down = time.monotonic()
                        if taken_over is None and await candidate.try_acquire():
                            taken_over = time.monotonic()
                        await asyncio.sleep(0.05)
                return stepped_down, taken_over
            finally:
                await through_proxy.close()
                await direct.close()

    stepped_down, taken_over = asyncio.run(scenario())
    assert stepped_down < taken_over, "two leaders: the candidate took over while the old one held"
    lease = cluster.get("lease", name, namespace="leases")
    assert lease is not None and lease["spec"]["holderIdentity"] == "candidate"
