"""The one module that talks to the API server (besides kopf's own watching).

A small asyncio client on aiohttp: server-side apply under one field manager, deletes,
metadata-only reads (a Secret's value never enters the operator), status merge patches,
Events, TokenReview and Leases. Credentials come from the in-cluster ServiceAccount or a
kubeconfig, loaded by the `kubernetes` package's loaders. Every request is counted, so the
benchmark can report API requests per FineTuneJob.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from kubetune.api import API_VERSION, KIND, PLURAL
from kubetune.builders import naming

log = logging.getLogger(__name__)

PLURALS = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaims",
    ("v1", "Pod"): "pods",
    ("v1", "Secret"): "secrets",
    ("v1", "Event"): "events",
    ("batch/v1", "Job"): "jobs",
    ("apps/v1", "Deployment"): "deployments",
    ("coordination.k8s.io/v1", "Lease"): "leases",
    (API_VERSION, KIND): PLURAL,
}
RETRIABLE = {429, 500, 502, 503, 504}
TOKEN_RECHECK_SECONDS = 10.0
"""How long a bearer token is reused before the loader's refresh hook runs again (projected
ServiceAccount tokens rotate after ~48 minutes at the earliest; the hook reloads them)."""
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"


class ApiError(RuntimeError):
    def __init__(self, status: int, method: str, path: str, body: Any) -> None:
        self.status = status
        message = body.get("message") if isinstance(body, dict) else str(body)[:300]
        self.message = str(message)
        """The API server's own words (its Status `message`), for conditions users read."""
        super().__init__(f"{method} {path}: HTTP {status}: {message}")


class NotLeading(RuntimeError):
    """A write this process may not send: it does not hold the leader Lease (any more)."""

    def __init__(self, method: str, path: str) -> None:
        super().__init__(f"{method} {path}: not sent, this operator does not hold the Lease")


WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def object_path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    scope = f"/namespaces/{namespace}" if namespace else ""
    path = f"{prefix}{scope}/{PLURALS[(api_version, kind)]}"
    return f"{path}/{name}" if name else path


RESOURCES = frozenset({*PLURALS.values(), "tokenreviews"})


def resource_of(path: str) -> str:
    """The resource a request is about, for the tally: `finetunejobs` for a status patch,
    `events` for a POST to a namespace's events, never an object's or a namespace's name
    (a label per name would grow without bound)."""
    parts = [part for part in path.split("?")[0].split("/") if part]
    return next((part for part in reversed(parts) if part in RESOURCES), parts[-1] if parts else "")


class KubeClient:
    """Async access to one cluster. Create with `connect()`, close with `close()`."""

    def __init__(
        self,
        server: str,
        ssl_context: ssl.SSLContext | bool,
        auth: Any,
        *,
        connections: int = 64,
        attempts: int = 5,
        write_gate: Callable[[], bool] | None = None,
    ) -> None:
        self.server = server.rstrip("/")
        self._ssl = ssl_context
        self._auth = auth  # kubernetes.client.Configuration: token refresh lives there
        self.connections = connections
        """Size of the connection pool: requests beyond it wait for a free connection."""
        self.attempts = attempts
        """Tries per request (throttling, server errors, dropped connections)."""
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None
        self._token_checked_at = -TOKEN_RECHECK_SECONDS
        self.requests: Counter[str] = Counter()
        """Requests sent, by `METHOD resource` (for the benchmark and /metrics)."""
        self.write_gate = write_gate
        """Asked before every write (and every retry of one): False refuses it with
        NotLeading. The operator's is `LeaseLock.leading`; the Lease's own client has none."""

    @classmethod
    def connect(cls, kubeconfig: str | None = None) -> KubeClient:
        from kubernetes import client, config

        configuration = client.Configuration()
        try:
            if kubeconfig:
                raise config.ConfigException("a kubeconfig was given")
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        context: ssl.SSLContext | bool
        if configuration.verify_ssl:
            context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
        else:
            context = False
        if configuration.cert_file and isinstance(context, ssl.SSLContext):
            context.load_cert_chain(configuration.cert_file, configuration.key_file)
        return cls(configuration.host, context, configuration)

    def sibling(
        self, connections: int, attempts: int, write_gate: Any = ...
    ) -> KubeClient:
        """A second client on the same cluster and credentials with a pool of its own: what
        it sends (the progress endpoint's TokenReviews) never waits for a connection this
        client's requests hold, nor makes them wait. Its requests are counted separately.
        It shares this client's write gate unless given its own (`None`: ungated)."""
        return KubeClient(
            self.server, self._ssl, self._auth, connections=connections, attempts=attempts,
            write_gate=self.write_gate if write_gate is ... else write_gate,
        )  # fmt: skip

    def _headers(self) -> dict[str, str]:
        headers = {"User-Agent": "kubetune-operator", "Accept": "application/json"}
        if self._auth is not None:
            now = time.monotonic()
            if now >= self._token_checked_at + TOKEN_RECHECK_SECONDS:
                # The loaders store a token as api_key["BearerToken"] (prefix "Bearer"
                # included); "authorization" is the older key, still used for basic auth.
                # The getter runs the loader's refresh hook (expiring in-cluster or exec
                # tokens), which re-reads files: not on every request.
                self._token = self._auth.get_api_key_with_prefix(
                    "BearerToken", alias="authorization"
                )
                self._token_checked_at = now
            if self._token:
                headers["Authorization"] = self._token
        return headers

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
        accept: str | None = None,
        ok_missing: bool = False,
    ) -> Any:
        """JSON in, JSON out; retries throttling (429), server errors and dropped connections
        a few times. A 409 conflict is raised, not retried: the caller must re-read (a PUT
        with a stale resourceVersion would only conflict again)."""
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._ssl, limit=self.connections)
            self._session = aiohttp.ClientSession(connector=connector)
        data = None if body is None else json.dumps(body)
        for attempt in range(self.attempts):
            if method in WRITES and self.write_gate is not None and not self.write_gate():
                raise NotLeading(method, path)
            if attempt == 0:
                self.requests[f"{method} {resource_of(path)}"] += 1
            headers = self._headers()
            headers["Content-Type"] = content_type
            if accept:
                headers["Accept"] = accept
            try:
                async with self._session.request(
                    method,
                    self.server + path,
                    data=data,
                    params=params,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=30),
                ) as response:
                    text = await response.text()
                    payload = json.loads(text) if text else None
                    if response.status < 400:
                        return payload
                    if response.status == 404 and ok_missing:
                        return None
                    error = ApiError(response.status, method, path, payload)
                    if response.status not in RETRIABLE:
                        raise error
            except (TimeoutError, aiohttp.ClientConnectionError) as exc:
                error = ApiError(0, method, path, str(exc))
            await asyncio.sleep(0.1 * 2**attempt)
        raise error

    # ------------------------------------------------------------------ children

    async def apply(
        self, manifest: Mapping[str, Any], metadata_only: bool = False
    ) -> dict[str, Any]:
        """Server-side apply under the `kubetune` field manager. `force` takes over fields
        another manager set by hand on our children (the operator is their owner).
        `metadata_only` asks for the answer as PartialObjectMetadata: a ConfigMap's data
        need not travel back and be parsed."""
        meta = manifest["metadata"]
        path = object_path(
            manifest["apiVersion"], manifest["kind"], meta.get("namespace"), meta["name"]
        )
        result: dict[str, Any] = await self.request(
            "PATCH",
            path,
            body=manifest,
            content_type="application/apply-patch+yaml",
            params={"fieldManager": naming.FIELD_MANAGER, "force": "true"},
            accept=METADATA_ONLY if metadata_only else None,
        )
        return result

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        # Background propagation: a Job's pods go with it, via the garbage collector.
        await self.request(
            "DELETE",
            object_path(api_version, kind, namespace, name),
            body={"propagationPolicy": "Background"},
            ok_missing=True,
        )

    async def exists(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Whether an object exists, reading its metadata only (never a Secret's data)."""
        found = await self.request(
            "GET",
            object_path(api_version, kind, namespace, name),
            accept=METADATA_ONLY,
            ok_missing=True,
        )
        return found is not None

    async def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> Any:
        return await self.request(
            "GET", object_path(api_version, kind, namespace, name), ok_missing=True
        )

    async def find(self, api_version: str, kind: str, namespace: str, name: str) -> Any:
        """One object by name through a list with a field selector, or None: for the kinds
        the operator lists and watches but has no `get` on (FineTuneJobs, Jobs; see the
        chart's templates/_rbac.tpl)."""
        found = await self.request(
            "GET",
            object_path(api_version, kind, namespace),
            params={"fieldSelector": f"metadata.name={name}"},
        )
        items = (found or {}).get("items") or []
        return {"apiVersion": api_version, "kind": kind, **items[0]} if items else None

    # ------------------------------------------------------------------ FineTuneJobs

    async def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> Any:
        """Merge patch of `status` (keys set to None are removed)."""
        return await self.request(
            "PATCH",
            object_path(API_VERSION, KIND, namespace, name) + "/status",
            body={"status": status},
            content_type="application/merge-patch+json",
            params={"fieldManager": naming.FIELD_MANAGER},
            ok_missing=True,
        )

    async def post_event(
        self, owner: Mapping[str, Any], type_: str, reason: str, message: str, now: str
    ) -> None:
        meta = owner["metadata"]
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "kubetune-operator"},
            "reportingComponent": "kubetune.io/operator",
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.request("POST", object_path("v1", "Event", meta["namespace"]), body=event)
        except ApiError as error:  # an event is best effort; the status holds the truth
            log.warning("could not post event %s on %s: %s", reason, meta["name"], error)

    async def list_pod_events(self, namespace: str, reason: str) -> list[dict[str, Any]]:
        """A namespace's Events about pods with `reason` (a field selector: the API server
        sends only those)."""
        found = await self.request(
            "GET",
            object_path("v1", "Event", namespace),
            params={"fieldSelector": f"involvedObject.kind=Pod,reason={reason}"},
        )
        return list((found or {}).get("items") or [])

    # ------------------------------------------------------------------ auth

    async def token_review(self, token: str, audiences: list[str]) -> dict[str, Any]:
        review = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": audiences},
        }
        result: dict[str, Any] = await self.request(
            "POST", "/apis/authentication.k8s.io/v1/tokenreviews", body=review
        )
        return result

    # ------------------------------------------------------------------ leases

    async def create(self, manifest: Mapping[str, Any]) -> Any:
        meta = manifest["metadata"]
        return await self.request(
            "POST",
            object_path(manifest["apiVersion"], manifest["kind"], meta.get("namespace")),
            body=manifest,
        )

    async def replace(self, manifest: Mapping[str, Any]) -> Any:
        """PUT with the manifest's resourceVersion: fails with 409 if someone wrote first."""
        meta = manifest["metadata"]
        return await self.request(
            "PUT",
            object_path(
                manifest["apiVersion"], manifest["kind"], meta.get("namespace"), meta["name"]
            ),
            body=manifest,
        )
