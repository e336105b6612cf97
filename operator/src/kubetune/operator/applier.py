"""Applying a FineTuneJob's children: server-side apply of what changed, deletes, and what this
process remembers having sent until the watches show it.

Separate from `kubetune.operator.controller` (which decides when a pass runs and patches the status)
because this is where API-server load is decided: which child is sent at all, in which lane
(`kubetune.operator.lanes`), and what an apply's answer stands for until the indexes catch up.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubetune.builders import naming
from kubetune.operator.client import ApiError, KubeClient
from kubetune.operator.lanes import Lanes
from kubetune.reconcile.drift import should_apply
from kubetune.reconcile.refusals import Refusal
from kubetune.reconcile.runs import slim

log = logging.getLogger(__name__)
Key = tuple[str, str]
STATUS_KINDS = {"Job", "Deployment"}
"""Children whose applied form the pass's status reads (the rest only need to exist)."""
CRITICAL_KINDS = {"Job", "Deployment", "PersistentVolumeClaim"}
"""Applied in the critical lane: pods wait for these (a claim included: pods cannot be
scheduled without it). ConfigMaps and Services follow when the lane is idle."""
UNSENDABLE = 2**62
"""The version recorded for a manifest the API server refused as invalid or immutable:
higher than any real one, so the same manifest is not sent again."""


class RetryLater(Exception):
    """The API server refused something transient; the pass is retried a little later."""


def _ref(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(kind, name): how this module tells children apart within one FineTuneJob."""
    return obj["kind"], obj["metadata"]["name"]


def resource_version(obj: Mapping[str, Any] | None) -> int:
    try:
        return int((obj or {}).get("metadata", {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


@dataclass
class Sent:
    """One apply this process made: the manifest's hash and the version the answer had."""

    digest: str
    version: int
    seen: bool = False
    """The index has shown this version (or a newer one) since: if the child is missing
    now, someone deleted it, and it is sent again."""
    refused: str | None = None
    """The API server's message when it refused this manifest (400/422)."""


@dataclass
class Applied:
    """What this process applied, until the watch shows it (indexes lag a little)."""

    sent: dict[tuple[str, str], Sent] = field(default_factory=dict)
    deleting: set[tuple[str, str]] = field(default_factory=set)


class Applier:
    def __init__(self, client: KubeClient, lanes: Lanes) -> None:
        self.client = client
        self._lanes = lanes
        self._records: defaultdict[Key, Applied] = defaultdict(Applied)

    def forget(self, key: Key) -> None:
        self._records.pop(key, None)

    def child_deleted(self, key: Key, kind: str, name: str) -> None:
        applied = self._records.get(key)
        if applied is not None:
            applied.sent.pop((kind, name), None)
            applied.deleting.discard((kind, name))

    def refusals(self, key: Key) -> list[Refusal]:
        """The children of this FineTuneJob that the API server refused, with its message."""
        applied = self._records.get(key)
        return [
            Refusal(kind=kind, name=name, digest=sent.digest, message=sent.refused)
            for (kind, name), sent in (applied.sent.items() if applied else ())
            if sent.refused is not None
        ]

    def needs_apply(
        self, key: Key, manifest: Mapping[str, Any], observed: Mapping[tuple[str, str], Any]
    ) -> bool:
        """`should_apply` (missing, hash changed, drifted: a pure decision on the observed
        child), unless this process already sent this very manifest and the index has not
        moved past that apply: either the watch has not delivered it yet, or it has and
        the child still reads as drifted, i.e. the server stores a value differently from
        how KubeTune writes it, and sending it again would change nothing."""
        ref = _ref(manifest)
        current = observed.get(ref)
        sent = self._records[key].sent.get(ref)
        version = resource_version(current)
        if sent is not None and current is not None and version >= sent.version:
            sent.seen = True
        if not should_apply(manifest, current):
            return False
        digest = manifest["metadata"]["annotations"][naming.ANNOTATION_HASH]
        if sent is None or sent.digest != digest:
            return True
        if current is None:
            return sent.seen  # deleted after the index showed it; else not there yet
        return version > sent.version  # someone changed it since our apply

    async def apply(
        self,
        key: Key,
        manifests: Sequence[Mapping[str, Any]],
        children: Sequence[Mapping[str, Any]],
    ) -> list[dict[str, Any]]:
        """Apply what `needs_apply` picks; return the applied Jobs and Deployments as the
        server answered (slimmed like the indexes' children).

        Every child kind is watched, so each manifest is decided from its observed object:
        an idle pass and a restart send nothing, a deleted or edited child is sent again.
        Jobs, Deployments and PVCs take the critical lane; ConfigMaps and Services follow
        when it is idle (see `kubetune.operator.lanes`)."""
        observed = {_ref(c): c for c in children}
        todo = [m for m in manifests if self.needs_apply(key, m, observed)]
        critical = [m for m in todo if m["kind"] in CRITICAL_KINDS]
        deferred = [m for m in todo if m["kind"] not in CRITICAL_KINDS]
        results: list[tuple[Mapping[str, Any], dict[str, Any]]] = []
        if critical:
            async with self._lanes.critical():
                results = await self._apply_all(key, critical)
        if deferred:
            async with self._lanes.deferred():
                await self._apply_all(key, deferred)
        return [
            _as_applied(manifest, result, observed.get(_ref(manifest)))
            for manifest, result in results
            if manifest["kind"] in STATUS_KINDS
        ]

    async def _apply_all(
        self, key: Key, manifests: Sequence[Mapping[str, Any]]
    ) -> list[tuple[Mapping[str, Any], dict[str, Any]]]:
        """Apply all at once; the (manifest, answer) pairs, or RetryLater if any failed (a
        failed one is not recorded, so the retried pass decides it again)."""
        outcomes = await asyncio.gather(
            *(self._apply_one(key, m) for m in manifests), return_exceptions=True
        )
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if errors:
            raise RetryLater("; ".join(str(e) for e in errors))
        return [(m, o) for m, o in zip(manifests, outcomes, strict=True) if isinstance(o, dict)]

    async def _apply_one(self, key: Key, manifest: Mapping[str, Any]) -> dict[str, Any] | None:
        ref = _ref(manifest)
        digest = manifest["metadata"]["annotations"][naming.ANNOTATION_HASH]
        try:
            # The answer's metadata (resourceVersion) is all this process keeps: a Job's full
            # answer (pod template, managedFields) would only be parsed to be dropped.
            result = await self.client.apply(manifest, metadata_only=True)
        except ApiError as error:
            if error.status not in (400, 422):
                raise
            # Invalid or immutable (e.g. a Job's pod template): retrying cannot help.
            # The refusal is kept for the status (`refusals`): the job must say why it waits.
            log.warning("%s/%s: cannot apply %s %s: %s", *key, *ref, error)
            self._records[key].sent[ref] = Sent(digest, UNSENDABLE, refused=error.message)
            return None
        self._records[key].sent[ref] = Sent(digest, resource_version(result))
        self._records[key].deleting.discard(ref)
        return result

    async def delete(self, key: Key, refs: Sequence[Any]) -> None:
        applied = self._records[key]
        todo = [r for r in refs if (r.kind, r.name) not in applied.deleting]
        try:
            await asyncio.gather(
                *(self.client.delete(r.api_version, r.kind, key[0], r.name) for r in todo)
            )
        except ApiError as error:
            raise RetryLater(str(error)) from error
        for ref in todo:
            applied.deleting.add((ref.kind, ref.name))
            applied.sent.pop((ref.kind, ref.name), None)


def _as_applied(
    manifest: Mapping[str, Any], answer: Mapping[str, Any], known: Mapping[str, Any] | None
) -> dict[str, Any]:
    """A child as the indexes would hold it once the watch delivers the applied object: the
    spec this process sent (it owns those fields), the server's identity and version, and
    the status already known (an apply does not change status)."""
    child = slim(manifest, manifest["kind"], manifest["apiVersion"])
    meta = answer.get("metadata") or {}
    for field_name in ("uid", "resourceVersion", "generation"):
        child["metadata"][field_name] = meta.get(field_name)
    child["status"] = dict((known or {}).get("status") or {})
    return child


def updated_children(
    children: Sequence[Mapping[str, Any]], applied: Sequence[Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    """`children` with the freshly applied objects in place of (or added to) what the
    indexes held; the newer resourceVersion wins."""
    merged = {_ref(c): c for c in children}
    for obj in applied:
        ref = _ref(obj)
        if resource_version(obj) >= resource_version(merged.get(ref)):
            merged[ref] = obj
    return list(merged.values())
