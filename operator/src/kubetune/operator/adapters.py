"""Driving a shared pool's adapters: the operator's HTTP calls to each Ready pool replica.

What to call is decided in `kubetune.reconcile.pool.adapter_calls` (pure); this module only
sends it: `GET /v1/models` (what a replica it has not loaded itself lists), `POST
/v1/load_lora_adapter {"lora_name", "lora_path"}` and `POST /v1/unload_lora_adapter
{"lora_name"}` (vLLM's names and bodies) to `http://<pod IP>:<port>`.

A replica that refuses an adapter (a 4xx: the adapter fails the server's checks) is reported
to that adapter's job and never stops the pool; a replica that cannot be reached (starting,
going away) is tried again on the next pass, having been recorded as knowing nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from kubetune.api.dataplane import AdapterSet
from kubetune.builders import naming
from kubetune.reconcile.pool import (
    UNKNOWN_PATH,
    AdapterCall,
    AdapterRefusal,
    LoadAdapter,
    UnloadAdapter,
    adapter_calls,
)

log = logging.getLogger(__name__)

CALL_TIMEOUT_SECONDS = 30.0
"""A load reads and checks an adapter off the pool claim before it answers."""
CONNECT_TIMEOUT_SECONDS = 3.0
"""A replica that does not accept a connection this soon is tried on the next pass."""


class Unreachable(Exception):
    """The replica did not answer (connection refused, timeout, 5xx)."""


@dataclass(frozen=True)
class Replica:
    """A Ready pool pod: its name, uid (a restarted pod is a new uid) and address."""

    name: str
    uid: str
    address: str
    """`http://<pod IP>:<port>`."""


def ready_replicas(pods: Sequence[Mapping[str, Any]]) -> list[Replica]:
    """The pool pods that are Ready and have an IP, by name."""
    replicas = []
    for pod in pods:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                    for c in status.get("conditions") or ())
        ip = status.get("podIP")
        if ready and ip and not meta.get("deletionTimestamp"):
            address = f"http://{ip}:{naming.SERVING_PORT}"
            replicas.append(Replica(meta.get("name", ""), meta.get("uid", ""), address))
    return sorted(replicas, key=lambda r: r.name)


def _message(body: Any, fallback: str) -> str:
    """OpenAI's error shape (`{"error": {"message"}}`), else the text."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return fallback


class AdapterClient:
    """The HTTP half: one aiohttp session for every pool replica."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_SECONDS,
                                            sock_connect=CONNECT_TIMEOUT_SECONDS)
            self._session = aiohttp.ClientSession(timeout=timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def listed(self, address: str) -> set[str]:
        """The adapters a replica serves (`/v1/models` entries with a `parent`)."""
        try:
            async with self._client().get(f"{address}/v1/models") as response:
                if response.status >= 400:
                    raise Unreachable(f"GET /v1/models: HTTP {response.status}")
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            raise Unreachable(f"GET /v1/models: {error or type(error).__name__}") from error
        return {str(m["id"]) for m in body.get("data") or () if m.get("parent")}

    async def call(self, address: str, call: AdapterCall) -> str | None:
        """Send one call: None when done, the server's message when it refused it (4xx).
        Raises Unreachable when the replica did not answer."""
        if isinstance(call, LoadAdapter):
            path, payload = "/v1/load_lora_adapter", {"lora_name": call.name,
                                                      "lora_path": call.path}
        else:
            path, payload = "/v1/unload_lora_adapter", {"lora_name": call.name}
        try:
            async with self._client().post(f"{address}{path}", json=payload) as response:
                text = await response.text()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as error:
            raise Unreachable(f"POST {path}: {error or type(error).__name__}") from error
        if status < 400:
            return None
        if status >= 500:
            raise Unreachable(f"POST {path}: HTTP {status}: {text[:200]}")
        try:
            body: Any = json.loads(text)
        except ValueError:
            body = None
        return _message(body, f"HTTP {status}: {text[:400]}")


class AdapterSync:
    """What each replica has loaded (by pod uid), as far as this process loaded it, and the
    refusals per adapter name; one sync of a pool at a time."""

    def __init__(self, client: AdapterClient | None = None) -> None:
        self.client = client or AdapterClient()
        self._loaded: dict[str, dict[str, str]] = {}
        """Pod uid -> {adapter name: path} this process loaded there (or saw listed)."""
        self._replicas: dict[tuple[str, str], set[str]] = {}
        self._refused: dict[tuple[str, str], list[AdapterRefusal]] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def refusals(self, namespace: str, pool: str) -> list[AdapterRefusal]:
        return list(self._refused.get((namespace, pool), ()))

    async def sync(
        self, namespace: str, pool: str, desired: AdapterSet, replicas: Sequence[Replica]
    ) -> list[AdapterRefusal]:
        """Bring every replica to `desired`; returns the refusals (also kept for the pool's
        other members' passes). A refused load is not retried until the set changes (a new
        generation is a new path)."""
        lock = self._locks.setdefault((namespace, pool), asyncio.Lock())
        async with lock:
            live = {replica.uid for replica in replicas}
            for gone in self._replicas.get((namespace, pool), set()) - live:
                self._loaded.pop(gone, None)  # a restarted pod is a new uid: it starts over
            self._replicas[(namespace, pool)] = live
            refusals = [r for r in self.refusals(namespace, pool)
                        if any(r.pod == replica.name for replica in replicas)
                        and any(a.name == r.name and a.path == r.path for a in desired.adapters)]
            for replica in replicas:
                refusals += await self._sync_replica(replica, desired, refusals)
            self._refused[(namespace, pool)] = refusals
            return refusals

    async def _sync_replica(
        self, replica: Replica, desired: AdapterSet, known: Sequence[AdapterRefusal]
    ) -> list[AdapterRefusal]:
        loaded = self._loaded.get(replica.uid)
        try:
            if loaded is None:
                loaded = dict.fromkeys(await self.client.listed(replica.address), UNKNOWN_PATH)
            refusals = []
            for call in adapter_calls(desired, loaded):
                if isinstance(call, LoadAdapter) and any(
                    r.pod == replica.name and r.name == call.name and r.path == call.path
                    for r in known
                ):
                    continue  # refused already: the same files would be refused again
                message = await self.client.call(replica.address, call)
                if message is not None:
                    log.warning("%s refused %s: %s", replica.name, call, message)
                    if isinstance(call, LoadAdapter):
                        refusals.append(AdapterRefusal(replica.name, call.name, message,
                                                       call.path))
                    continue
                if isinstance(call, UnloadAdapter):
                    loaded.pop(call.name, None)
                else:
                    loaded[call.name] = call.path
        except Unreachable as error:
            log.info("pool replica %s: %s; tried again on the next pass", replica.name, error)
            self._loaded.pop(replica.uid, None)
            return []
        self._loaded[replica.uid] = loaded
        return refusals
