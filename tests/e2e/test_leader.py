"""Leader election against the real API server: a leader whose API server stalls steps down
before a candidate takes the Lease over (issue 13, finding 11), and an operator that finds
another holder in its Lease writes nothing more (issue 28, item 8).

The leader talks to the API server through a TCP proxy that this test can freeze: frozen, it
keeps the leader's connections open and forwards nothing, the way a wedged load balancer or a
partitioned node looks to a client. Without a deadline on renewals, the client's own retries
(5 attempts, 30 s each) hold one renewal for minutes while the candidate takes over after one
lease duration; with it, the leader gives up first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

from cluster import Cluster, wait_for

from kubetune.operator.client import KubeClient
from kubetune.operator.leader import LeaseLock

from .operator_harness import (
    REPORT,
    OperatorProcess,
    finetunejob,
    make_claim,
    pod_token,
    post_progress,
    running_operator,
    succeed,
    wait_ftj,
    wait_items,
)

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


# ------------------------------------------------------------------ losing the Lease
# (issue 28, item 8)

RENEW_LEASE_SECONDS = 18
"""The operator renews every 6 s and would give up 12 s after its last renewal."""
RENEW_EVERY = RENEW_LEASE_SECONDS / 3
SLACK = 1.5
"""Seconds past its next renewal by which an operator must have seen another holder in its
Lease and stopped writing (a GET at most; generous on a busy machine)."""
AUDIENCE = "kubetune.io/progress"


class LosingOperator(OperatorProcess):
    """The harness's operator on a Lease of its own (no other module's operator shares it),
    with status patches of progress at most every 2 s: a report is pending most of the time."""

    lease_name = f"losing-{uuid.uuid4().hex[:6]}"

    def __init__(self, cluster: Cluster, workdir: Any) -> None:
        super().__init__(cluster, workdir, lease_duration=RENEW_LEASE_SECONDS)

    def argv(self, *extra: str) -> list[str]:
        return super().argv("--lease-name", self.lease_name, "--progress-min-interval", "2",
                            *extra)  # fmt: skip


APPLIED = frozenset({"jobs", "deployments", "services", "configmaps", "persistentvolumeclaims"})


def _writes_seen_by_the_api_server(cluster: Cluster) -> int:
    """Writes only an operator sends here, from kube-apiserver's own `apiserver_request_total`:
    server-side applies of the kinds it applies, FineTuneJob status patches and TokenReviews.
    (Events and pods' and Jobs' status are written by the controllers and kwok too, and the
    namespace controller deletes the FineTuneJobs of other tests' namespaces.)"""
    text = cluster.kubectl("get", "--raw", "/metrics").stdout
    total = 0
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
        verb, resource = labels.get("verb"), labels.get("resource")
        if (
            (verb == "APPLY" and resource in APPLIED)
            or (resource == "finetunejobs" and verb == "PATCH")
            or resource == "tokenreviews"
        ):
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def _take_the_lease_right_after_a_renewal(cluster: Cluster, name: str) -> float:
    """Write another holder into the Lease just after the operator renewed it; the monotonic
    time of that write. Its next renewal, RENEW_EVERY later, finds the usurper."""
    def renewed_since(seen: str) -> dict[str, Any]:
        def renewed() -> dict[str, Any] | None:
            lease = cluster.get("lease", name, namespace="default")
            return lease if lease and lease["spec"]["renewTime"] != seen else None

        return wait_for(renewed, timeout=3 * RENEW_EVERY, what="the operator to renew its Lease")

    first = cluster.get("lease", name, namespace="default")
    assert first is not None
    seen = first["spec"]["renewTime"]
    while True:
        lease = renewed_since(seen)
        lease["spec"]["holderIdentity"] = "usurper"
        taken = cluster.kubectl("replace", "-f", "-", input=json.dumps(lease), check=False)
        if taken.returncode == 0:  # else it renewed in between (a conflict): next renewal
            return time.monotonic()
        seen = lease["spec"]["renewTime"]


def test_nothing_is_written_once_the_lease_is_lost(cluster: Cluster, namespace: str,
                                                   tmp_path: Any) -> None:  # fmt: skip
    """A report accepted while leading and still pending (the sink's rate limit), and every
    report after, must not reach the API server once the operator has seen another holder in
    its Lease: without the gate it went on patching until its renew deadline passed and kopf
    had stopped."""
    make_claim(cluster, namespace)
    with running_operator(cluster, tmp_path, LosingOperator) as operator:
        # No GPUs: kwok leaves the pod of a deleted namespace in place for a while, and on a
        # GPU node it held the GPUs test_operator's two-node test waits for (180 s, then failed).
        cluster.apply(finetunejob("lose", namespace, train=succeed("600s", REPORT),
                                  resources={"gpusPerNode": 0}))
        trainer = wait_items(
            cluster, "pods", namespace,
            "kubetune.io/job=lose,app.kubernetes.io/component=trainer",
            lambda ps: len(ps) == 1 and ps[0]["status"].get("phase") == "Running", timeout=90,
        )[0]  # fmt: skip
        token = pod_token(cluster, namespace, trainer["metadata"]["name"], AUDIENCE)
        assert post_progress(operator.progress_url, namespace, "lose", token, {"step": 1}) == 202
        wait_ftj(cluster, namespace, "lose",
                 lambda o: (o["status"].get("progress") or {}).get("step") == 1)  # fmt: skip

        posted: list[tuple[float, int]] = []
        stop = threading.Event()

        def report() -> None:  # the trainer goes on reporting, every half second
            step = 2
            while not stop.wait(0.5):
                try:
                    code = post_progress(
                        operator.progress_url, namespace, "lose", token, {"step": step}
                    )
                except OSError:
                    code = 0  # the operator is gone
                posted.append((time.monotonic(), code))
                step += 1

        reporter = threading.Thread(target=report, daemon=True)
        reporter.start()
        try:
            lost = _take_the_lease_right_after_a_renewal(cluster, LosingOperator.lease_name)
            time.sleep(max(0.0, lost + RENEW_EVERY + SLACK - time.monotonic()))
            writes_at_cutoff = _writes_seen_by_the_api_server(cluster)
            cutoff = time.monotonic()
            # Past the deadline the operator itself would give up by (two renewals).
            time.sleep(max(0.0, lost + 2 * RENEW_EVERY + 3 - time.monotonic()))
            writes_after = _writes_seen_by_the_api_server(cluster) - writes_at_cutoff
        finally:
            stop.set()
            reporter.join(10)
        assert [code for at, code in posted if at > cutoff], "no report came after the loss"
        accepted = [at - lost for at, code in posted if code == 202 and at > cutoff]
        assert writes_after == 0, (
            f"{writes_after} write(s) reached the API server after the Lease was lost "
            f"(reports accepted {accepted} s after it)\n{operator.logs()[-3000:]}"
        )
        lease = cluster.get("lease", LosingOperator.lease_name, namespace="default")
        assert lease is not None and lease["spec"]["holderIdentity"] == "usurper"
