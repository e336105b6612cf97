"""kopf wiring only: indexes of children, and handlers a few lines long that call the
controller. Handlers return nothing (a returned value would land in status) and raise
`kopf.TemporaryError` instead of sleeping.

A resync loop (not a kopf timer: see `resync_forever`) makes the operator level-based.
Indexes hold the FineTuneJobs and their Jobs, Pods and Deployments, keyed by
(namespace, FineTuneJob name). kopf fills them from the watches before any handler runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import kopf

from kubetune import naming
from kubetune.api import GROUP, PLURAL, VERSION
from kubetune.controller import Controller, RetryLater
from kubetune.metrics import OperatorMetrics
from kubetune.progress_server import ProgressSink

MANAGED = {naming.LABEL_MANAGED_BY: naming.MANAGED_BY}
CHILD_INDEXES = ("kubetune_jobs", "kubetune_pods", "kubetune_deployments")


def _slim(body: kopf.Body, kind: str, api_version: str) -> dict[str, Any]:
    """What reconcile reads of a child; the rest (pod specs, managedFields) is dropped."""
    meta = body.metadata
    spec = dict(body.spec)
    slim_spec: dict[str, Any] = {}
    for key in ("suspend", "parallelism", "completions", "replicas"):
        if key in spec:
            slim_spec[key] = spec[key]
    template_meta = (spec.get("template") or {}).get("metadata")
    if template_meta:
        slim_spec["template"] = {"metadata": dict(template_meta)}
    return {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {
            "name": meta.name,
            "namespace": meta.namespace,
            "uid": meta.uid,
            "generation": meta.get("generation"),
            "resourceVersion": meta.get("resourceVersion"),
            "labels": dict(meta.labels),
            "annotations": dict(meta.annotations),
        },
        "spec": slim_spec,
        "status": dict(body.status),
    }


def _owner_key(body: kopf.Body) -> tuple[str, str] | None:
    job = body.metadata.labels.get(naming.LABEL_JOB)
    return (body.metadata.namespace or "", job) if job else None


def children_of(key: tuple[str, str], indexes: Mapping[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for name in CHILD_INDEXES:
        found.extend(indexes[name].get(key, ()))
    return found


INDEXES = ("finetunejobs", *CHILD_INDEXES)


async def _reconcile(memo: kopf.Memo, body: Mapping[str, Any], indexes: Mapping[str, Any]) -> None:
    if "indexes" not in memo.shared:
        # kopf's indexes are live views: keep them for the resync loop, which no handler
        # calls. kopf gives each object a shallow copy of the memo: `shared` is one dict.
        memo.shared["indexes"] = {name: indexes[name] for name in INDEXES}
    key = (body["metadata"]["namespace"], body["metadata"]["name"])
    controller: Controller = memo.controller
    metrics: OperatorMetrics | None = memo.get("metrics")
    if metrics is not None:
        metrics.reconciles.inc()
    try:
        await controller.reconcile(body, children_of(key, indexes))
    except RetryLater as error:
        if metrics is not None:
            metrics.reconcile_errors.inc()
        raise kopf.TemporaryError(str(error), delay=5) from error
    except Exception:
        if metrics is not None:
            metrics.reconcile_errors.inc()
        raise


async def resync_forever(memo: kopf.Memo, interval: float) -> None:
    """Level-based safety net: every `interval` seconds, reconcile every FineTuneJob from the
    indexes. It catches what no event announces (a Secret created later, a missed watch
    event); with nothing to change a pass sends no request.

    A loop rather than `@kopf.timer`: kopf puts a finalizer on every object with a timer,
    which costs a patch and a round trip before the first Job, and blocks deletion
    whenever the operator is not running.
    """
    log = logging.getLogger(__name__)
    while True:
        await asyncio.sleep(interval)  # the resync period itself, not a wait for a condition
        indexes = memo.shared.get("indexes")
        if indexes is None:
            continue
        for bodies in list(indexes["finetunejobs"].values()):
            for body in list(bodies):
                try:
                    await _reconcile(memo, body, indexes)
                except kopf.TemporaryError as error:
                    log.warning("resync of %s: %s", body["metadata"]["name"], error)


def register(registry: kopf.OperatorRegistry) -> None:
    """Put the handlers on `registry` (one per operator; tests build their own)."""

    @kopf.on.login(registry=registry, id="login")
    def login(**kwargs: Any) -> Any:
        # A registry of our own has none of kopf's default login handlers.
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.index(GROUP, VERSION, PLURAL, registry=registry, id="finetunejobs")
    def finetunejobs(body: kopf.Body, **_: Any) -> Any:
        return {(body.metadata.namespace, body.metadata.name): dict(body)}

    @kopf.index("batch", "v1", "jobs", labels=MANAGED, registry=registry, id="kubetune_jobs")
    def kubetune_jobs(body: kopf.Body, **_: Any) -> Any:
        key = _owner_key(body)
        return {key: _slim(body, "Job", "batch/v1")} if key else None

    @kopf.index("", "v1", "pods", labels=MANAGED, registry=registry, id="kubetune_pods")
    def kubetune_pods(body: kopf.Body, **_: Any) -> Any:
        key = _owner_key(body)
        return {key: _slim(body, "Pod", "v1")} if key else None

    @kopf.index(
        "apps", "v1", "deployments", labels=MANAGED, registry=registry, id="kubetune_deployments"
    )
    def kubetune_deployments(body: kopf.Body, **_: Any) -> Any:
        key = _owner_key(body)
        return {key: _slim(body, "Deployment", "apps/v1")} if key else None

    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry, id="created")
    async def created(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
        await _reconcile(memo, body, kwargs)

    @kopf.on.update(GROUP, VERSION, PLURAL, registry=registry, id="updated")
    async def updated(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
        await _reconcile(memo, body, kwargs)

    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry, id="resumed")
    async def resumed(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
        await _reconcile(memo, body, kwargs)

    # Children are owned: the garbage collector deletes them. Nothing to block on, so no
    # finalizer (optional=True); only this process's memory of the job is dropped.
    @kopf.on.delete(GROUP, VERSION, PLURAL, optional=True, registry=registry, id="deleted")
    async def deleted(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        key = (body.metadata.namespace or "", body.metadata.name or "")
        memo.controller.forget(key)
        sink: ProgressSink = memo.sink
        sink.forget(key)

    async def child_changed(
        body: kopf.Body, type: str | None, memo: kopf.Memo, **kwargs: Any
    ) -> None:
        key = _owner_key(body)
        if key is None:
            return
        if type == "DELETED":
            memo.controller.child_deleted(key, body.get("kind", ""), body.metadata.name)
        owners = kwargs["finetunejobs"].get(key)
        for owner in owners or ():
            try:
                await _reconcile(memo, owner, kwargs)
            except kopf.TemporaryError as error:
                # Event handlers are not retried; the timer will pick it up.
                logging.getLogger(__name__).warning("%s/%s: %s", *key, error)

    for group, version, plural in (
        ("batch", "v1", "jobs"),
        ("", "v1", "pods"),
        ("apps", "v1", "deployments"),
    ):
        kopf.on.event(
            group, version, plural, labels=MANAGED, registry=registry, id="child_changed"
        )(child_changed)


GLOB_CHARACTERS = frozenset("*?!,")


def needs_scanning(namespaces: Sequence[str]) -> bool:
    """Whether kopf must list and watch Namespaces: only to match `--namespace` globs
    (kopf's patterns: `*`, `?`, `!negation`, `a,b` lists). Exact names, or all namespaces,
    need no Namespace listing. Pure."""
    return any(GLOB_CHARACTERS & set(pattern) for pattern in namespaces)


def settings(
    prefix: str = "kubetune.io", namespaces: Sequence[str] = ()
) -> kopf.OperatorSettings:
    """kopf's bookkeeping in annotations (never in status), few events of its own."""
    result = kopf.OperatorSettings()
    # kopf's scanning lists and watches CRDs and Namespaces, which least-privilege RBAC does
    # not grant: kopf then retries for about a minute before serving anything. The CRD is
    # installed before the operator starts (one discovery at startup still finds it), so
    # scanning is only kept for namespace globs, which need the Namespace list to match.
    result.scanning.disabled = not needs_scanning(namespaces)
    result.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
    result.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=prefix, key="last-handled-configuration"
    )
    result.persistence.finalizer = f"{prefix}/finalizer"
    # kopf would post an Event per handler run; the operator posts its own on transitions.
    result.posting.level = logging.WARNING
    result.watching.server_timeout = 300
    # kopf keeps one worker per object for `idle_timeout` after its last event; a cap on
    # workers would make a burst of new objects wait for idle ones to expire.
    result.queueing.worker_limit = None
    result.queueing.idle_timeout = 1.0
    # (kopf 1.45 removed time-based batching: no batch window delays a reaction any more.)
    result.execution.max_workers = 4
    # On SIGTERM kopf stops and `kubetune operator` then releases its Lease: no SIGKILL.
    result.process.ultimate_exiting_timeout = None
    return result
