"""kopf's in-memory indexes of FineTuneJobs and their children, keyed by (namespace, job).

A reconcile pass reads the job's children from these instead of listing them from the API
server: the watches kopf keeps open are the only reads in steady state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from kubetune.api import GROUP, PLURAL, VERSION
from kubetune.builders import naming
from kubetune.reconcile.runs import slim

MANAGED = {naming.LABEL_MANAGED_BY: naming.MANAGED_BY}
CHILD_INDEXES = ("kubetune_jobs", "kubetune_pods", "kubetune_deployments")


def owner_key(body: kopf.Body) -> tuple[str, str] | None:
    job = body.metadata.labels.get(naming.LABEL_JOB)
    return (body.metadata.namespace or "", job) if job else None


def children_of(key: tuple[str, str], indexes: Mapping[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for name in CHILD_INDEXES:
        found.extend(indexes[name].get(key, ()))
    return found


INDEXES = ("finetunejobs", *CHILD_INDEXES)


def register_indexes(registry: kopf.OperatorRegistry) -> None:
    """Put the index handlers on `registry`."""

    @kopf.index(GROUP, VERSION, PLURAL, registry=registry, id="finetunejobs")
    async def finetunejobs(body: kopf.Body, **_: Any) -> Any:
        return {(body.metadata.namespace, body.metadata.name): dict(body)}

    @kopf.index("batch", "v1", "jobs", labels=MANAGED, registry=registry, id="kubetune_jobs")
    async def kubetune_jobs(body: kopf.Body, **_: Any) -> Any:
        key = owner_key(body)
        return {key: slim(body, "Job", "batch/v1")} if key else None

    @kopf.index("", "v1", "pods", labels=MANAGED, registry=registry, id="kubetune_pods")
    async def kubetune_pods(body: kopf.Body, **_: Any) -> Any:
        key = owner_key(body)
        return {key: slim(body, "Pod", "v1")} if key else None

    @kopf.index(
        "apps", "v1", "deployments", labels=MANAGED, registry=registry, id="kubetune_deployments"
    )
    async def kubetune_deployments(body: kopf.Body, **_: Any) -> Any:
        key = owner_key(body)
        return {key: slim(body, "Deployment", "apps/v1")} if key else None
