"""One reconcile pass for one FineTuneJob: observe, decide (pure), act (through `kube`).

Handlers call `Controller.reconcile` with the FineTuneJob's body and its children from kopf's
indexes (filled from watches before any handler runs, so a restarted operator sees every
existing child and re-creates nothing). Children whose applied-hash annotation matches the
desired manifest are not applied again, and an unchanged status is not patched: while
nothing changes, a pass sends no request at all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from kubetune import naming
from kubetune.api import FineTuneJobSpec, PlanStatus
from kubetune.api.deepspeed import deepspeed_config
from kubetune.builders import pod
from kubetune.conditions import Event
from kubetune.kube import ApiError, KubeClient
from kubetune.lanes import Lanes
from kubetune.lookups import ExistenceCache
from kubetune.observe import slim
from kubetune.operator_config import OperatorConfig
from kubetune.planner import PlanError, plan
from kubetune.reconcile import Observed, needs_reference_check, reconcile

log = logging.getLogger(__name__)
Key = tuple[str, str]
WATCHED = {"Job", "Deployment"}
"""Child kinds kept in kopf indexes (with Pods, which the operator never applies)."""


class RetryLater(Exception):
    """The API server refused something transient; the handler asks kopf to retry."""


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rv(obj: Mapping[str, Any] | None) -> int:
    try:
        return int((obj or {}).get("metadata", {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


def plan_for(spec: FineTuneJobSpec) -> tuple[PlanStatus | None, str | None, dict[str, Any]]:
    """(plan, why it does not fit, DeepSpeed config). The planner lives in its own module."""
    try:
        resolved = plan(spec)
    except PlanError as error:
        return None, str(error), {}
    return resolved, None, deepspeed_config(spec, resolved)


@dataclass
class Applied:
    """What this process applied, until the watch shows it (indexes lag a little)."""

    hashes: dict[tuple[str, str], tuple[str, int]] = field(default_factory=dict)
    deleting: set[tuple[str, str]] = field(default_factory=set)
    unsent: set[tuple[str, str]] = field(default_factory=set)
    """Unwatched children whose last apply failed: sent again on the next pass."""


class Controller:
    def __init__(
        self,
        client: KubeClient,
        config: OperatorConfig,
        clock: Callable[[], str] = utc_now,
    ) -> None:
        self.client = client
        self.config = config
        self.clock = clock
        self._locks: defaultdict[Key, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._applied: defaultdict[Key, Applied] = defaultdict(Applied)
        self._latest: dict[Key, dict[str, Any]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._references = ExistenceCache(client.exists)
        self._lanes = Lanes()
        self._last_pass: dict[Key, float] = {}

    # ------------------------------------------------------------------ bookkeeping

    def forget(self, key: Key) -> None:
        """The FineTuneJob is gone: drop what this process remembered about it."""
        self._applied.pop(key, None)
        self._latest.pop(key, None)
        self._last_pass.pop(key, None)
        self._locks.pop(key, None)

    def child_deleted(self, key: Key, kind: str, name: str) -> None:
        applied = self._applied.get(key)
        if applied is not None:
            applied.hashes.pop((kind, name), None)
            applied.deleting.discard((kind, name))

    def remember(self, key: Key, body: Mapping[str, Any]) -> None:
        """A newer FineTuneJob body seen by someone else (e.g. a progress patch's response)."""
        if _rv(body) > _rv(self._latest.get(key)):
            self._latest[key] = dict(body)

    def _freshest(self, key: Key, body: Mapping[str, Any]) -> Mapping[str, Any]:
        """The body as given, or the one our last status patch returned if that is newer."""
        latest = self._latest.get(key)
        return latest if latest is not None and _rv(latest) > _rv(body) else body

    def wrote(self, key: Key, body: Mapping[str, Any]) -> bool:
        """Whether `body` is exactly the version this process's last status patch produced
        (its watch event echoes a decision already made)."""
        latest = self._latest.get(key)
        return latest is not None and _rv(body) > 0 and _rv(body) == _rv(latest)

    def passed_within(self, key: Key, seconds: float) -> bool:
        """Whether a pass over this FineTuneJob ran in the last `seconds` (the resync skips
        it: an event got there first)."""
        return time.monotonic() - self._last_pass.get(key, -1e18) < seconds

    # ------------------------------------------------------------------ the pass

    async def reconcile(
        self, body: Mapping[str, Any], children: Sequence[Mapping[str, Any]]
    ) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        async with self._locks[key]:
            self._last_pass[key] = time.monotonic()
            await self._reconcile(key, self._freshest(key, body), children)

    async def _reconcile(
        self, key: Key, body: Mapping[str, Any], children: Sequence[Mapping[str, Any]]
    ) -> None:
        namespace, name = key
        try:
            spec = FineTuneJobSpec.model_validate(body.get("spec") or {})
        except ValidationError as error:
            # Admission should have refused it (an older CRD?): say so, create nothing.
            await self._patch_status(key, body, _invalid_spec_status(body, error, self.clock()))
            return
        plan, plan_error, deepspeed = plan_for(spec)
        missing: list[str] = []
        if needs_reference_check(body):
            missing = await self._missing_references(namespace, spec)
        observed = Observed(
            body=body,
            spec=spec,
            plan=plan,
            plan_error=plan_error,
            deepspeed=deepspeed,
            missing=missing,
            children=children,
            now=self.clock(),
        )
        outcome = reconcile(observed, self.config)
        applied = await self._apply(key, outcome.apply, children)
        if applied:
            # Decide the status again with what the apply responses say (a new Job is already
            # Queued or Pending): one status patch now instead of a second one when the
            # watch delivers the Job. What else this pass would apply waits for that event.
            observed = dataclasses.replace(observed, children=_updated(children, applied))
            outcome = reconcile(observed, self.config)
        await self._delete(key, outcome.delete)
        if outcome.status_patch:
            async with self._lanes.deferred():
                await self._patch_status(key, body, outcome.status_patch)
            now = self.clock()
            for event in outcome.events:
                log.info("%s/%s: %s %s", namespace, name, event.reason, event.message)
                # Best effort and off the critical path: the status already says it.
                task = asyncio.create_task(self._post_event(body, event, now))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _post_event(self, body: Mapping[str, Any], event: Event, now: str) -> None:
        async with self._lanes.deferred():
            await self.client.post_event(body, event.type, event.reason, event.message, now)

    async def _missing_references(self, namespace: str, spec: FineTuneJobSpec) -> list[str]:
        wanted = [("Secret", secret) for secret in pod.referenced_secrets(spec)]
        claims = set(pod.pvc_claims(spec))
        if spec.storage.claim_name:
            claims.add(spec.storage.claim_name)
        wanted += [("PersistentVolumeClaim", claim) for claim in sorted(claims)]
        try:
            found = await asyncio.gather(
                *(self._references.exists("v1", kind, namespace, obj) for kind, obj in wanted)
            )
        except ApiError as error:
            raise RetryLater(str(error)) from error
        return [f'{kind} "{obj}"' for (kind, obj), ok in zip(wanted, found, strict=True) if not ok]

    def _needs_apply(
        self, key: Key, manifest: Mapping[str, Any], observed: Mapping[tuple[str, str], Any]
    ) -> bool:
        ref = (manifest["kind"], manifest["metadata"]["name"])
        digest = manifest["metadata"]["annotations"][naming.ANNOTATION_HASH]
        current = observed.get(ref)
        if current is not None:
            current_hash = (current["metadata"].get("annotations") or {}).get(
                naming.ANNOTATION_HASH
            )
            if current_hash == digest:
                return False
        applied = self._applied[key].hashes.get(ref)
        # Our own apply not yet visible in the index: do not send it again.
        return not (applied and applied[0] == digest and applied[1] > _rv(current))

    async def _apply(
        self,
        key: Key,
        manifests: Sequence[Mapping[str, Any]],
        children: Sequence[Mapping[str, Any]],
    ) -> list[dict[str, Any]]:
        """Apply what changed; return the applied Jobs and Deployments as the server answered
        (slimmed like the indexes' children).

        ConfigMaps, Services and PVCs are not watched: they are sent along whenever a Job or
        Deployment is (skipped when this process already sent the same hash), or again after
        a failed apply, so an idle pass and a restart send nothing. Jobs, Deployments and
        PVCs (pods cannot be scheduled without their claim) take the critical lane; the
        ConfigMap and Service follow when it is idle (see `kubetune.lanes`)."""
        observed = {(c["kind"], c["metadata"]["name"]): c for c in children}
        watched = [
            m for m in manifests if m["kind"] in WATCHED and self._needs_apply(key, m, observed)
        ]
        record = self._applied[key]
        companions = [
            m
            for m in manifests
            if m["kind"] not in WATCHED
            and (watched or (m["kind"], m["metadata"]["name"]) in record.unsent)
            and record.hashes.get((m["kind"], m["metadata"]["name"]), ("",))[0]
            != m["metadata"]["annotations"][naming.ANNOTATION_HASH]
        ]
        critical = [*watched, *(m for m in companions if m["kind"] == "PersistentVolumeClaim")]
        deferred = [m for m in companions if m["kind"] != "PersistentVolumeClaim"]
        results: list[tuple[Mapping[str, Any], dict[str, Any]]] = []
        if critical:
            async with self._lanes.critical():
                results = await self._apply_all(key, critical)
        if deferred:
            async with self._lanes.deferred():
                await self._apply_all(key, deferred)
        return [
            _as_applied(
                manifest, result, observed.get((manifest["kind"], manifest["metadata"]["name"]))
            )
            for manifest, result in results
            if manifest["kind"] in WATCHED
        ]

    async def _apply_all(
        self, key: Key, manifests: Sequence[Mapping[str, Any]]
    ) -> list[tuple[Mapping[str, Any], dict[str, Any]]]:
        """Apply all at once; the (manifest, answer) pairs, or RetryLater if any failed."""
        outcomes = await asyncio.gather(
            *(self._apply_one(key, m) for m in manifests), return_exceptions=True
        )
        record = self._applied[key]
        errors = []
        for manifest, outcome in zip(manifests, outcomes, strict=True):
            ref = (manifest["kind"], manifest["metadata"]["name"])
            if isinstance(outcome, BaseException):
                errors.append(outcome)
                if ref[0] not in WATCHED:
                    record.unsent.add(ref)
            else:
                record.unsent.discard(ref)
        if errors:
            raise RetryLater("; ".join(str(e) for e in errors))
        return [(m, o) for m, o in zip(manifests, outcomes, strict=True) if isinstance(o, dict)]

    async def _apply_one(self, key: Key, manifest: Mapping[str, Any]) -> dict[str, Any] | None:
        ref = (manifest["kind"], manifest["metadata"]["name"])
        digest = manifest["metadata"]["annotations"][naming.ANNOTATION_HASH]
        try:
            # The answer's metadata (resourceVersion) is all this process keeps: a Job's full
            # answer (pod template, managedFields) would only be parsed to be dropped.
            result = await self.client.apply(manifest, metadata_only=True)
        except ApiError as error:
            if error.status not in (400, 422):
                raise
            # Invalid or immutable (e.g. a Job's pod template): retrying cannot help.
            log.warning("%s/%s: cannot apply %s %s: %s", *key, *ref, error)
            self._applied[key].hashes[ref] = (digest, 2**62)
            return None
        self._applied[key].hashes[ref] = (digest, _rv(result))
        self._applied[key].deleting.discard(ref)
        return result

    async def _delete(self, key: Key, refs: Sequence[Any]) -> None:
        applied = self._applied[key]
        todo = [r for r in refs if (r.kind, r.name) not in applied.deleting]
        try:
            await asyncio.gather(
                *(self.client.delete(r.api_version, r.kind, key[0], r.name) for r in todo)
            )
        except ApiError as error:
            raise RetryLater(str(error)) from error
        for ref in todo:
            applied.deleting.add((ref.kind, ref.name))
            applied.hashes.pop((ref.kind, ref.name), None)

    async def _patch_status(
        self, key: Key, body: Mapping[str, Any], patch: Mapping[str, Any]
    ) -> None:
        try:
            result = await self.client.patch_status(key[0], key[1], patch)
        except ApiError as error:
            raise RetryLater(str(error)) from error
        if result is not None:
            self._latest[key] = result


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


def _updated(
    children: Sequence[Mapping[str, Any]], applied: Sequence[Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    """`children` with the freshly applied objects in place of (or added to) what the
    indexes held; the newer resourceVersion wins."""
    merged = {(c["kind"], c["metadata"]["name"]): c for c in children}
    for obj in applied:
        ref = (obj["kind"], obj["metadata"]["name"])
        if _rv(obj) >= _rv(merged.get(ref)):
            merged[ref] = obj
    return list(merged.values())


def _invalid_spec_status(
    body: Mapping[str, Any], error: ValidationError, now: str
) -> dict[str, Any]:
    generation = body["metadata"].get("generation")
    message = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
    )[:1024]
    return {
        "observedGeneration": generation,
        "phase": "Invalid",
        "conditions": [
            {
                "type": "Validated",
                "status": "False",
                "reason": "InvalidSpec",
                "message": message,
                "observedGeneration": generation,
                "lastTransitionTime": now,
            }
        ],
    }
