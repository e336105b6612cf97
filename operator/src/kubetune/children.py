"""The FineTuneJob's children as reconcile reads them: picked by kind and component, their
training generation, and the ones a newer generation leaves stale.

Pure selection over the labelled objects the caller gathered. Separate from `kubetune.reconcile`
because it only reads labels and names; reconcile then decides what to do with the result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubetune import naming


@dataclass(frozen=True)
class ChildRef:
    api_version: str
    kind: str
    name: str


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


def _of(
    children: Sequence[Mapping[str, Any]], kind: str, component: str
) -> list[Mapping[str, Any]]:
    return [
        c
        for c in children
        if c.get("kind") == kind and _labels(c).get(naming.LABEL_COMPONENT) == component
    ]


def _named(objs: Sequence[Mapping[str, Any]], name: str) -> Mapping[str, Any] | None:
    return next((o for o in objs if o["metadata"]["name"] == name), None)


def _generation_of(obj: Mapping[str, Any]) -> int | None:
    value = _labels(obj).get(naming.LABEL_GENERATION)
    return int(value) if value and value.isdigit() else None


def current_generation(
    children: Sequence[Mapping[str, Any]], training_hash: str, spec_generation: int
) -> int:
    """The training generation: the newest training Job's, while its training hash still
    matches the spec; a new one (the spec's generation) otherwise. Suspending changes the
    spec generation but not the training hash, so a resumed run keeps its generation."""
    jobs = _of(children, "Job", naming.COMPONENT_TRAINER)
    matching = [
        _generation_of(j)
        for j in jobs
        if (j["metadata"].get("annotations") or {}).get(naming.ANNOTATION_TRAINING_HASH)
        == training_hash
    ]
    found = [g for g in matching if g is not None]
    return max(found) if found else spec_generation


def _pods_of(children: Sequence[Mapping[str, Any]], job_name: str) -> list[Mapping[str, Any]]:
    return [
        c
        for c in children
        if c.get("kind") == "Pod" and _labels(c).get("batch.kubernetes.io/job-name") == job_name
    ]


def _stale_children(children: Sequence[Mapping[str, Any]], generation: int) -> list[ChildRef]:
    """Training children of other generations. ConfigMaps and Services are not watched (no
    need to hold every ConfigMap of the cluster in memory): their names follow from the old
    trainer Job's generation, which is deleted last so a crash half-way repeats the cleanup."""
    stale = []
    for job in _of(children, "Job", naming.COMPONENT_TRAINER):
        old = _generation_of(job)
        if old is None or old == generation:
            continue
        owner = _labels(job).get(naming.LABEL_JOB, "")
        stale += [
            ChildRef("v1", "ConfigMap", naming.config_map_name(owner, old)),
            ChildRef("v1", "Service", naming.rendezvous_service_name(owner, old)),
            ChildRef("batch/v1", "Job", naming.export_job_name(owner, old)),
            ChildRef("batch/v1", "Job", job["metadata"]["name"]),
        ]
    for job in _of(children, "Job", naming.COMPONENT_EXPORTER):
        old = _generation_of(job)
        if old is not None and old != generation:
            stale.append(ChildRef("batch/v1", "Job", job["metadata"]["name"]))
    return list(dict.fromkeys(stale))
