"""The operator's adapter calls (`kubetune.operator.adapters`) against a real HTTP server on
loopback that speaks the pool server's endpoints (vLLM's names and bodies): what reaches a
replica, in what order, and what a refusal or an unreachable replica does."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from aiohttp import web

from kubetune.api import FineTuneJobSpec
from kubetune.api.dataplane import AdapterSet, ServedAdapter
from kubetune.operator.adapters import AdapterSync, Replica, ready_replicas
from tests.unit.operator_fixtures import spec_dict


class FakeReplica:
    """A pool server's adapter endpoints: loads replace by name, `bad` paths are refused with
    a 400 in OpenAI's error shape, as the server refuses an adapter that fails its checks."""

    def __init__(self, listed: dict[str, str] | None = None) -> None:
        self.adapters: dict[str, str] = dict(listed or {})
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/load_lora_adapter", self.load)
        app.router.add_post("/v1/unload_lora_adapter", self.unload)
        return app

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": "team-pool"}] + [{"id": n, "parent": "team-pool"} for n in self.adapters]
        return web.json_response({"object": "list", "data": data})

    async def load(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(("load", body))
        if "bad" in body["lora_path"]:
            error = {"message": f"adapter {body['lora_name']!r}: DoRA cannot be served",
                     "type": "invalid_request_error"}
            return web.json_response({"error": error}, status=400)
        self.adapters[body["lora_name"]] = body["lora_path"]
        return web.json_response({"status": "loaded"})

    async def unload(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(("unload", body))
        if self.adapters.pop(body["lora_name"], None) is None:
            return web.json_response({"error": {"message": "not loaded"}}, status=404)
        return web.json_response({"status": "unloaded"})


async def _serve(replica: FakeReplica) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(replica.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def _set(**paths: str) -> AdapterSet:
    return AdapterSet(adapters=[ServedAdapter(name=n, path=p) for n, p in paths.items()])


def test_the_set_is_loaded_then_only_changes_are_sent() -> None:
    async def scenario() -> None:
        fake = FakeReplica()
        runner, address = await _serve(fake)
        sync = AdapterSync()
        replica = Replica("pool-1", "uid-1", address)
        try:
            both = _set(a="/adapters/a/gen-1", b="/adapters/b/gen-1")
            assert await sync.sync("ns", "team", both, [replica]) == []
            assert fake.adapters == {"a": "/adapters/a/gen-1", "b": "/adapters/b/gen-1"}
            fake.calls.clear()

            await sync.sync("ns", "team", both, [replica])
            assert fake.calls == []  # nothing changed, nothing sent

            # a's generation 2 replaces it; b is deleted.
            await sync.sync("ns", "team", _set(a="/adapters/a/gen-2"), [replica])
            assert fake.calls == [
                ("load", {"lora_name": "a", "lora_path": "/adapters/a/gen-2"}),
                ("unload", {"lora_name": "b"}),
            ]
            assert fake.adapters == {"a": "/adapters/a/gen-2"}
        finally:
            await sync.client.close()
            await runner.cleanup()

    asyncio.run(scenario())


def test_a_refused_adapter_is_reported_the_rest_load_and_it_is_not_resent() -> None:
    async def scenario() -> None:
        fake = FakeReplica()
        runner, address = await _serve(fake)
        sync = AdapterSync()
        replica = Replica("pool-1", "uid-1", address)
        try:
            wanted = _set(a="/adapters/a/gen-1", d="/adapters/d/bad-1")
            refusals = await sync.sync("ns", "team", wanted, [replica])
            assert [(r.pod, r.name) for r in refusals] == [("pool-1", "d")]
            assert "DoRA cannot be served" in refusals[0].message
            assert fake.adapters == {"a": "/adapters/a/gen-1"}  # the pool serves on
            fake.calls.clear()

            again = await sync.sync("ns", "team", wanted, [replica])
            assert [r.name for r in again] == ["d"] and fake.calls == []
            assert [r.name for r in sync.refusals("ns", "team")] == ["d"]

            # A new generation of d is offered again.
            fixed = _set(a="/adapters/a/gen-1", d="/adapters/d/gen-2")
            assert await sync.sync("ns", "team", fixed, [replica]) == []
            assert fake.adapters["d"] == "/adapters/d/gen-2"
        finally:
            await sync.client.close()
            await runner.cleanup()

    asyncio.run(scenario())


def test_a_replica_this_process_did_not_load_is_brought_to_the_set_from_its_listing() -> None:
    """An operator restart, or a replica that read the ConfigMap at start: what it lists is
    loaded again at the wanted path (its path is not known), and the rest unloaded."""

    async def scenario() -> None:
        fake = FakeReplica({"a": "/adapters/a/gen-1", "old": "/adapters/old/gen-1"})
        runner, address = await _serve(fake)
        sync = AdapterSync()
        try:
            await sync.sync("ns", "team", _set(a="/adapters/a/gen-1"),
                            [Replica("pool-2", "uid-2", address)])
            assert fake.calls == [
                ("load", {"lora_name": "a", "lora_path": "/adapters/a/gen-1"}),
                ("unload", {"lora_name": "old"}),
            ]
        finally:
            await sync.client.close()
            await runner.cleanup()

    asyncio.run(scenario())


def test_an_unreachable_replica_is_left_for_the_next_pass() -> None:
    async def scenario() -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]  # closed again: nothing listens there
        sync = AdapterSync()
        try:
            refusals = await sync.sync("ns", "team", _set(a="/adapters/a/gen-1"),
                                       [Replica("pool-1", "uid-1", f"http://127.0.0.1:{port}")])
            assert refusals == []
        finally:
            await sync.client.close()

    asyncio.run(scenario())


def test_only_ready_pods_with_an_ip_are_replicas() -> None:
    def pool_pod(name: str, ready: str, ip: str | None) -> dict[str, Any]:
        status: dict[str, Any] = {"conditions": [{"type": "Ready", "status": ready}]}
        if ip:
            status["podIP"] = ip
        return {"metadata": {"name": name, "uid": f"uid-{name}"}, "status": status}

    pods = [pool_pod("b", "True", "10.0.0.2"), pool_pod("a", "True", "10.0.0.1"),
            pool_pod("c", "False", "10.0.0.3"), pool_pod("d", "True", None)]
    assert ready_replicas(pods) == [Replica("a", "uid-a", "http://10.0.0.1:8000"),
                                    Replica("b", "uid-b", "http://10.0.0.2:8000")]


def test_the_controller_reports_a_refusal_to_its_job_and_revisits_the_others(
    tmp_path: Any, monkeypatch: Any
) -> None:
    """A member's pass loads the set on the pool's Ready pods (found by their pod IP, here the
    loopback server): its own adapter's refusal is what its status gets; another member's
    refusal schedules that member's pass (`revisit`)."""
    import yaml

    from kubetune.builders import naming
    from kubetune.operator.client import KubeClient
    from kubetune.operator.controller import Controller
    from kubetune.reconcile.decide import Outcome, PoolTarget
    from tests.unit.operator_fixtures import CONFIG

    async def scenario() -> None:
        fake = FakeReplica()
        runner, address = await _serve(fake)
        monkeypatch.setattr(naming, "SERVING_PORT", int(address.rsplit(":", 1)[1]))
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({  # no request reaches it in this test
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:9"}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "x"}))
        client = KubeClient.connect(str(kubeconfig))
        controller = Controller(client, CONFIG)
        pool_pod = {"kind": "Pod", "metadata": {
            "name": "team-pool-1", "uid": "p1",
            "labels": {"app.kubernetes.io/component": "server", "kubetune.io/pool": "team"}},
            "status": {"podIP": "127.0.0.1",
                       "conditions": [{"type": "Ready", "status": "True"}]}}
        target = PoolTarget("team", _set(a="/adapters/a/gen-1", d="/adapters/d/bad-1"))
        try:
            mine = await controller._drive_adapters(("ns", "a"), Outcome(pool=target),
                                                    [pool_pod])
            assert mine is None and fake.adapters == {"a": "/adapters/a/gen-1"}
            assert controller.revisit() == [("ns", "d")] and controller.revisit() == []
            # d's own pass: its status gets the server's reason.
            theirs = await controller._drive_adapters(("ns", "d"), Outcome(pool=target),
                                                      [pool_pod])
            assert theirs is not None and "DoRA cannot be served" in theirs
            assert controller._adapter_refusal(
                ("ns", "d"),
                FineTuneJobSpec.model_validate(
                    spec_dict(serving={"share": "team"}))) == theirs
        finally:
            await controller.adapters.client.close()
            await client.close()
            await runner.cleanup()

    asyncio.run(scenario())
