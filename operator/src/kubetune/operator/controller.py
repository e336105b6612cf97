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
from typing import Any

from pydantic import ValidationError

from kubetune.api import FineTuneJobSpec, PlanStatus
from kubetune.builders import naming, pod
from kubetune.builders.config import OperatorConfig
from kubetune.operator.adapters import AdapterSync, ready_replicas
from kubetune.operator.applier import Applier, RetryLater, resource_version, updated_children
from kubetune.operator.client import ApiError, KubeClient
from kubetune.operator.indexes import kept_finetunejob
from kubetune.operator.lanes import Lanes
from kubetune.operator.references import ExistenceCache
from kubetune.planner.deepspeed import deepspeed_config
from kubetune.planner.plan import PlanError, plan
from kubetune.reconcile.attach import (
    ATTACH_EVENT_REASON,
    PodEvent,
    pod_event,
    waiting_for_volumes,
)
from kubetune.reconcile.children import of_component
from kubetune.reconcile.conditions import Event
from kubetune.reconcile.decide import (
    Observed,
    Outcome,
    invalid_spec_status,
    needs_reference_check,
    reconcile,
)
from kubetune.reconcile.pool import refusal_message

log = logging.getLogger(__name__)
Key = tuple[str, str]
__all__ = ["Controller", "RetryLater", "plan_for", "utc_now"]


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def plan_for(spec: FineTuneJobSpec) -> tuple[PlanStatus | None, str | None, dict[str, Any]]:
    """(plan, why it does not fit, DeepSpeed config). The planner lives in its own module."""
    try:
        resolved = plan(spec)
    except PlanError as error:
        return None, str(error), {}
    return resolved, None, deepspeed_config(spec, resolved)


class Controller:
    def __init__(
        self,
        client: KubeClient,
        config: OperatorConfig,
        clock: Callable[[], str] = utc_now,
        check_secrets: bool = True,
    ) -> None:
        self.client = client
        self.config = config
        self.clock = clock
        self.check_secrets = check_secrets
        """Look referenced Secrets up before training. Off where RBAC grants no `secrets: get`
        (the chart's cluster-wide mode): a missing Secret then shows on the pods instead
        (CreateContainerConfigError, read by `reconcile.runs`)."""
        self._locks: defaultdict[Key, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._latest: dict[Key, dict[str, Any]] = {}
        """The body this process's last status patch (or progress patch) returned, until the
        watch delivers that version or a newer one (`wrote`): from then on the index holds
        it, and a copy per settled job would only cost memory."""
        self._background: set[asyncio.Task[None]] = set()
        self._references = ExistenceCache(client.exists)
        self._lanes = Lanes()
        self._applier = Applier(client, self._lanes)
        self._last_pass: dict[Key, float] = {}
        self.adapters = AdapterSync()
        """What each shared pool's replicas have loaded; the HTTP calls that change it."""
        self._revisit: set[Key] = set()

    # ------------------------------------------------------------------ bookkeeping

    def forget(self, key: Key) -> None:
        """The FineTuneJob is gone: drop what this process remembered about it."""
        self._applier.forget(key)
        self._latest.pop(key, None)
        self._last_pass.pop(key, None)
        self._locks.pop(key, None)

    def cancel_background(self) -> None:
        """The Lease is lost: drop the Events not yet posted."""
        for task in list(self._background):
            task.cancel()

    def child_deleted(self, key: Key, kind: str, name: str) -> None:
        self._applier.child_deleted(key, kind, name)

    def remember(self, key: Key, body: Mapping[str, Any]) -> None:
        """A newer FineTuneJob body seen by someone else (e.g. a progress patch's response)."""
        if resource_version(body) > resource_version(self._latest.get(key)):
            self._latest[key] = kept_finetunejob(body)

    def _freshest(self, key: Key, body: Mapping[str, Any]) -> Mapping[str, Any]:
        """The body as given, or the one our last status patch returned if that is newer.
        Called holding the job's lock: a `body` as new as ours means the index has caught
        up, and every pass queued behind this one read the index later (the lock is FIFO),
        so our copy is dropped."""
        latest = self._latest.get(key)
        if latest is None:
            return body
        if resource_version(latest) > resource_version(body):
            return latest
        del self._latest[key]
        return body

    def newest(self, key: Key) -> Mapping[str, Any] | None:
        """The body this process's last patch returned, while the watch has not delivered
        that version (or a newer one) yet; None otherwise."""
        return self._latest.get(key)

    def wrote(self, key: Key, body: Mapping[str, Any]) -> bool:
        """Whether `body` is exactly the version this process's last status patch produced
        (its watch event echoes a decision already made). `body` is the watch's: once it is
        that version or a newer one, the index holds it and the patch's answer is dropped,
        unless a pass holds or awaits the job's lock (it may have read the index before the
        echo: `_freshest` drops it then)."""
        latest = self._latest.get(key)
        version = resource_version(body)
        if latest is None or version <= 0:
            return False
        written = resource_version(latest)
        if version >= written and not self.lock(key).locked():
            del self._latest[key]
        return version == written

    def lock(self, key: Key) -> asyncio.Lock:
        """The job's lock: one pass at a time per FineTuneJob, in the order they came."""
        return self._locks[key]

    async def critical_idle(self) -> None:
        """Return when no critical write (a Job, a Deployment, a claim) is in flight, or
        after the lanes' longest wait: passes that follow child events go after them."""
        await self._lanes.wait_turn()

    def passed_within(self, key: Key, seconds: float) -> bool:
        """Whether a pass over this FineTuneJob ran in the last `seconds` (the resync skips
        it: an event got there first)."""
        return time.monotonic() - self._last_pass.get(key, -1e18) < seconds

    # ------------------------------------------------------------------ the pass

    async def reconcile(
        self,
        body: Mapping[str, Any],
        children: Sequence[Mapping[str, Any]],
        peers: Sequence[Mapping[str, Any]] = (),
        pool_children: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        """`peers` and `pool_children`: the namespace's FineTuneJobs and the pool's objects,
        for a job that names a pool (`serving.share`)."""
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        async with self.lock(key):
            self._last_pass[key] = time.monotonic()
            await self._reconcile(key, self._freshest(key, body), children, peers, pool_children)

    def _adapter_refusal(self, key: Key, spec: FineTuneJobSpec) -> str | None:
        share = spec.serving.share
        if share is None:
            return None
        return refusal_message(self.adapters.refusals(key[0], share), key[1])

    async def _drive_adapters(self, key: Key, outcome: Outcome,
                              pool_children: Sequence[Mapping[str, Any]]) -> str | None:
        """Bring the pool's Ready replicas to the set this pass decided; this job's refusal."""
        target = outcome.pool
        if target is None:
            return None
        pods = of_component(pool_children, "Pod", naming.COMPONENT_POOL_SERVER)
        before = self.adapters.refusals(key[0], target.pool)
        refusals = await self.adapters.sync(key[0], target.pool, target.adapters,
                                            ready_replicas(pods))
        # Another member's adapter refused (or no longer refused) by this pass's loads: its
        # status says so on its own pass, which the caller schedules.
        for adapter in {r.name for r in before} ^ {r.name for r in refusals}:
            if adapter != key[1]:
                self._revisit.add((key[0], adapter))
        return refusal_message(refusals, key[1])

    def revisit(self) -> list[Key]:
        """The pool members whose adapter's refusal changed in another member's pass (each
        returned once): their status is behind until they are reconciled."""
        keys = sorted(self._revisit)
        self._revisit.clear()
        return keys

    async def _reconcile(
        self,
        key: Key,
        body: Mapping[str, Any],
        children: Sequence[Mapping[str, Any]],
        peers: Sequence[Mapping[str, Any]] = (),
        pool_children: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        namespace, name = key
        try:
            spec = FineTuneJobSpec.model_validate(body.get("spec") or {})
        except ValidationError as error:
            # Admission should have refused it (an older CRD?): say so, create nothing.
            await self._patch_status(key, body, invalid_spec_status(body, error, self.clock()))
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
            refused=self._applier.refusals(key),
            events=await self._attach_events(namespace, children),
            peers=peers,
            pool_children=pool_children,
            adapter_refusal=self._adapter_refusal(key, spec),
        )
        outcome = reconcile(observed, self.config)
        # The pool's objects are compared with what the pool's index holds, as children are.
        applied = await self._applier.apply(key, outcome.apply, [*children, *pool_children])
        refused = self._applier.refusals(key)
        if applied or refused != list(observed.refused):
            # Decide the status again with what the apply responses say (a new Job is already
            # Queued or Pending; a child the API server refused is reported with its message):
            # one status patch now instead of a second one when the watch delivers the Job.
            # What else this pass would apply waits for that event.
            observed = dataclasses.replace(
                observed, children=updated_children(children, applied), refused=refused
            )
            outcome = reconcile(observed, self.config)
        await self._applier.delete(key, outcome.delete)
        refusal = await self._drive_adapters(key, outcome, pool_children)
        if outcome.pool is not None and refusal != observed.adapter_refusal:
            # The pool's server refused this job's adapter (or took it now): say so now.
            observed = dataclasses.replace(observed, adapter_refusal=refusal)
            outcome = reconcile(observed, self.config)
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

    async def _attach_events(
        self, namespace: str, children: Sequence[Mapping[str, Any]]
    ) -> list[PodEvent]:
        """The namespace's volume-attach failures, only while a pod of this job waits for its
        volumes (a pass over work that runs or ended sends no extra request). Best effort:
        without them (an older chart's RBAC has no `events: list`) status says less."""
        pods = [child for child in children if child.get("kind") == "Pod"]
        if not waiting_for_volumes(pods):
            return []
        try:
            listed = await self.client.list_pod_events(namespace, ATTACH_EVENT_REASON)
        except ApiError as error:
            log.warning("%s: cannot list attach events: %s", namespace, error)
            return []
        return [event for event in map(pod_event, listed) if event is not None]

    async def _missing_references(self, namespace: str, spec: FineTuneJobSpec) -> list[str]:
        secrets = pod.referenced_secrets(spec) if self.check_secrets else []
        wanted = [("Secret", secret) for secret in secrets]
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

    async def _patch_status(
        self, key: Key, body: Mapping[str, Any], patch: Mapping[str, Any]
    ) -> None:
        try:
            result = await self.client.patch_status(key[0], key[1], patch)
        except ApiError as error:
            raise RetryLater(str(error)) from error
        if result is not None:
            self._latest[key] = kept_finetunejob(result)
