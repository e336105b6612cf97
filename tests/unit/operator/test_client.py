"""KubeClient credentials: a ServiceAccount token from a kubeconfig reaches the API server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from kubetune.operator.client import KubeClient

TOKEN = "eyJhbGciOiJSUzI1NiJ9.test-service-account-token"


def _token_kubeconfig(path: Path, server: str, token: str = TOKEN) -> Path:
    """A kubeconfig like the one built for a ServiceAccount: a `token:` user, no certificate."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "sa"}}],
        "current-context": "ctx",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_token_kubeconfig_sends_the_bearer_token(tmp_path: Path) -> None:
    kubeconfig = _token_kubeconfig(tmp_path / "kubeconfig", "https://127.0.0.1:6443")
    client = KubeClient.connect(str(kubeconfig))
    assert client.server == "https://127.0.0.1:6443"
    assert client._headers()["Authorization"] == f"Bearer {TOKEN}"


def test_the_token_goes_out_on_every_request(tmp_path: Path) -> None:
    """Through a real request to a loopback server: what the API server would see."""
    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"kind": "Pod", "metadata": {"name": "p"}})

    async def scenario() -> Any:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/team/pods/p", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        kubeconfig = _token_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{port}")
        client = KubeClient.connect(str(kubeconfig))
        try:
            return await client.get("v1", "Pod", "team", "p")
        finally:
            await client.close()
            await runner.cleanup()

    pod = asyncio.run(scenario())
    assert pod["metadata"]["name"] == "p"
    assert seen == [f"Bearer {TOKEN}"]


def test_no_credentials_send_no_authorization_header(tmp_path: Path) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "nobody", "user": {}}],
        "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "nobody"}}],
        "current-context": "ctx",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    headers = KubeClient.connect(str(path))._headers()
    assert "Authorization" not in headers
    assert headers["User-Agent"] == "kubetune-operator"
