"""KubeClient pieces the progress endpoint relies on: a sibling client with its own pool and
tries, reads by name through `list`, and a request tally keyed by resource, never by name.

A loopback aiohttp server stands in for the API server here; tests/e2e/test_progress_auth.py
makes the same reads against a real kube-apiserver.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from kubetune.operator.client import ApiError, KubeClient, resource_of


def test_the_tally_names_resources_not_objects_or_namespaces() -> None:
    base = "/apis/kubetune.io/v1alpha1/namespaces/team"
    assert resource_of(f"{base}/finetunejobs/demo/status") == "finetunejobs"
    assert resource_of("/api/v1/namespaces/team/events") == "events"
    assert resource_of("/apis/batch/v1/namespaces/team/jobs?fieldSelector=x") == "jobs"
    assert resource_of("/apis/authentication.k8s.io/v1/tokenreviews") == "tokenreviews"


def test_find_lists_by_name_and_a_sibling_does_not_retry() -> None:
    seen: list[tuple[str, str | None]] = []

    async def jobs(request: web.Request) -> web.Response:
        selector = request.query.get("fieldSelector", "")
        seen.append((request.path, selector))
        items = [{"metadata": {"name": "demo-g1-train"}}] if selector.endswith("train") else []
        return web.json_response({"kind": "JobList", "items": items})

    async def busy(request: web.Request) -> web.Response:
        seen.append((request.path, None))
        return web.json_response({"message": "throttled"}, status=429)

    async def scenario() -> tuple[Any, Any, int]:
        app = web.Application()
        app.router.add_get("/apis/batch/v1/namespaces/team/jobs", jobs)
        app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", busy)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        client = KubeClient(f"http://127.0.0.1:{runner.addresses[0][1]}", False, None)
        reviewer = client.sibling(connections=2, attempts=1)
        try:
            found = await reviewer.find("batch/v1", "Job", "team", "demo-g1-train")
            missing = await reviewer.find("batch/v1", "Job", "team", "nothing")
            try:
                await reviewer.token_review("t", ["a"])
            except ApiError as error:
                status = error.status
            return found, missing, status
        finally:
            await reviewer.close()
            await client.close()
            await runner.cleanup()

    found, missing, status = asyncio.run(scenario())
    assert found == {"apiVersion": "batch/v1", "kind": "Job",
                     "metadata": {"name": "demo-g1-train"}}  # fmt: skip
    assert missing is None
    assert status == 429
    prefix = "/apis/batch/v1/namespaces/team/jobs"
    assert seen == [
        (prefix, "metadata.name=demo-g1-train"),
        (prefix, "metadata.name=nothing"),
        ("/apis/authentication.k8s.io/v1/tokenreviews", None),  # one try, no retries
    ]
