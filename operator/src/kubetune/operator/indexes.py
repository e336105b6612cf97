"""kopf's in-memory indexes of FineTuneJobs and their children, keyed by (namespace, job).

A reconcile pass reads the job's children from these instead of listing them from the API
server: the watches kopf keeps open are the only reads in steady state. Every kind KubeTune
applies is watched, so a child someone deletes or edits is seen (and put back) at once; the
watches ask the API server for KubeTune's children only (`CHILD_KINDS`, label selector
`MANAGED`), so the cluster's other ConfigMaps and Services never reach the operator.

What is kept is what a pass reads: children as `observed_view` slims them, FineTuneJobs as
`kept_finetunejob` does (without `managedFields`). With 1,000 jobs these indexes are most
of what the operator holds (bench/fleet.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kopf

from kubetune.api import GROUP, PLURAL, VERSION
from kubetune.builders import naming
from kubetune.reconcile.drift import observed_view

MANAGED = {naming.LABEL_MANAGED_BY: naming.MANAGED_BY}
MANAGED_SELECTOR = f"{naming.LABEL_MANAGED_BY}={naming.MANAGED_BY}"


@dataclass(frozen=True)
class ChildKind:
    group: str
    version: str
    plural: str
    kind: str
    index: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


CHILD_KINDS = (
    ChildKind("batch", "v1", "jobs", "Job", "kubetune_jobs"),
    ChildKind("", "v1", "pods", "Pod", "kubetune_pods"),
    ChildKind("apps", "v1", "deployments", "Deployment", "kubetune_deployments"),
    ChildKind("", "v1", "services", "Service", "kubetune_services"),
    ChildKind("", "v1", "configmaps", "ConfigMap", "kubetune_configmaps"),
    ChildKind("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", "kubetune_claims"),
)
CHILD_INDEXES = tuple(child.index for child in CHILD_KINDS)


POOL_KEY_PREFIX = "pool:"
"""A shared pool's objects (label `kubetune.io/pool`) are indexed under (namespace,
"pool:<name>"): no FineTuneJob is named so (a ':' is no part of an object name)."""


def pool_key(namespace: str, pool: str) -> tuple[str, str]:
    return (namespace, f"{POOL_KEY_PREFIX}{pool}")


def pool_of_key(key: tuple[str, str]) -> str | None:
    """The pool name of a `pool_key`, None for a FineTuneJob's key."""
    name = key[1]
    return name.removeprefix(POOL_KEY_PREFIX) if name.startswith(POOL_KEY_PREFIX) else None


def owner_key(body: kopf.Body) -> tuple[str, str] | None:
    job = body.metadata.labels.get(naming.LABEL_JOB)
    if job:
        return (body.metadata.namespace or "", job)
    pool = body.metadata.labels.get(naming.LABEL_POOL)
    return pool_key(body.metadata.namespace or "", pool) if pool else None


def kept_finetunejob(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the operator keeps of a FineTuneJob (its index, the controller's newest body):
    the body without `metadata.managedFields`. Nothing reads them, and they are the largest
    part of a settled job's body: the API server lists there, per writer, every field it
    set, so every status field the operator ever wrote is in them once more. A shallow copy:
    spec and status are shared with the body kopf parsed, not copied."""
    metadata = {k: v for k, v in (body.get("metadata") or {}).items() if k != "managedFields"}
    return {**body, "metadata": metadata}


def children_of(key: tuple[str, str], indexes: Mapping[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for name in CHILD_INDEXES:
        found.extend(indexes[name].get(key, ()))
    return found


INDEXES = ("finetunejobs", *CHILD_INDEXES)


def share_of(body: Mapping[str, Any]) -> str | None:
    """The pool a FineTuneJob body names (`spec.serving.share`), read without validating."""
    share = ((body.get("spec") or {}).get("serving") or {}).get("share")
    return share if isinstance(share, str) and share else None


def namespace_jobs(namespace: str, indexes: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The namespace's FineTuneJobs, from the index (a snapshot: kopf's index is live)."""
    return [body for (ns, _), bodies in list(indexes["finetunejobs"].items()) if ns == namespace
            for body in list(bodies)]


def pool_members(namespace: str, pool: str, indexes: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The FineTuneJobs of `namespace` that name `pool`."""
    return [body for body in namespace_jobs(namespace, indexes) if share_of(body) == pool]


def register_indexes(registry: kopf.OperatorRegistry) -> None:
    """Put the index handlers on `registry`."""

    @kopf.index(GROUP, VERSION, PLURAL, registry=registry, id="finetunejobs")
    async def finetunejobs(body: kopf.Body, **_: Any) -> Any:
        return {(body.metadata.namespace, body.metadata.name): kept_finetunejob(body)}

    for child in CHILD_KINDS:
        kopf.index(
            child.group, child.version, child.plural,
            labels=MANAGED, registry=registry, id=child.index,
        )(_indexer(child))  # fmt: skip


def _indexer(child: ChildKind) -> Any:
    async def index(body: kopf.Body, **_: Any) -> Any:
        key = owner_key(body)
        return {key: observed_view(body, child.kind, child.api_version)} if key else None

    return index
