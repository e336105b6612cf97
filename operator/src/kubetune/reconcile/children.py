"""The FineTuneJob's children as reconcile reads them: picked by kind and component, their
training generation, and the ones a newer generation leaves stale.

Pure selection over the labelled objects the caller gathered. Separate from
`kubetune.reconcile.decide` because it only reads labels and names; `decide` then decides what
to do with the result.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubetune.api.status import TrainingStatus
from kubetune.builders import naming


@dataclass(frozen=True)
class ChildRef:
    api_version: str
    kind: str
    name: str


def labels_of(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


def of_component(
    children: Sequence[Mapping[str, Any]], kind: str, component: str
) -> list[Mapping[str, Any]]:
    return [
        c
        for c in children
        if c.get("kind") == kind and labels_of(c).get(naming.LABEL_COMPONENT) == component
    ]


def named(objs: Sequence[Mapping[str, Any]], name: str) -> Mapping[str, Any] | None:
    return next((o for o in objs if o["metadata"]["name"] == name), None)


def generation_of(obj: Mapping[str, Any]) -> int | None:
    value = labels_of(obj).get(naming.LABEL_GENERATION)
    return int(value) if value and value.isdigit() else None


def current_generation(
    children: Sequence[Mapping[str, Any]],
    training_hashes: Collection[str],
    spec_generation: int,
) -> int:
    """The training generation read from the Jobs, for a FineTuneJob whose status records
    none (`status.training`; one an operator before the record started): the newest training
    Job's, while its training hash still matches the spec (any of `training_hashes`: today's,
    and the one older operators wrote); a new one (the spec's generation) otherwise."""
    found = _trainer_generations(children, training_hashes)
    return max(found) if found else spec_generation


def _trainer_generations(
    children: Sequence[Mapping[str, Any]], training_hashes: Collection[str] | None
) -> list[int]:
    """Generations of the trainer Jobs, of those whose training hash is one of
    `training_hashes` (of all of them when None)."""
    found = []
    for job in of_component(children, "Job", naming.COMPONENT_TRAINER):
        annotations = job["metadata"].get("annotations") or {}
        if training_hashes is not None and (
            annotations.get(naming.ANNOTATION_TRAINING_HASH) not in training_hashes
        ):
            continue
        generation = generation_of(job)
        if generation is not None:
            found.append(generation)
    return found


def training_generation(
    recorded: TrainingStatus | None,
    children: Sequence[Mapping[str, Any]],
    training_hashes: Collection[str],
    spec_generation: int,
    spec_valid: bool,
) -> int:
    """The generation to train under. `recorded` (`status.training`) is the truth: the
    generation lives on when its Jobs are gone, so a deleted Job comes back under it and
    resumes from its checkpoint. Any edit the training hash leaves out (serving, suspend,
    cadences) keeps it. An edit that changes the hash starts a new generation, the spec's,
    but only once the spec is valid: an invalid spec starts nothing and stops nothing, so
    the recorded generation goes on, and reverting the edit finds it again.

    A matching trainer Job newer than the record is taken: the pass that created it could
    not write status. Without a record (a FineTuneJob an older operator started) the Jobs
    tell, as they did then. A new generation is never below the recorded one: a status
    restored beside a spec whose generation started again from 1 must not reuse an old run
    directory and its checkpoints."""
    if recorded is None:
        if spec_valid:
            return current_generation(children, training_hashes, spec_generation)
        running = _trainer_generations(children, None)
        return max(running) if running else spec_generation
    if recorded.training_hash in training_hashes or not spec_valid:
        return recorded.generation
    newer = [g for g in _trainer_generations(children, training_hashes) if g > recorded.generation]
    if newer:
        return max(newer)
    return max(spec_generation, recorded.generation + 1)


def controller_of(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ownerReference with `controller: true`, if any (there is at most one)."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or ():
        if ref.get("controller") is True:
            return ref
    return None


def pods_of_job(
    children: Sequence[Mapping[str, Any]], job: Mapping[str, Any] | None
) -> list[Mapping[str, Any]]:
    """The pods the Job controller made for `job`: their controller reference names the Job's
    uid. Labels decide nothing: anyone who may create pods in the namespace can copy the
    `batch.kubernetes.io/job-name` label and a termination message, but the controller
    reference is the Job controller's, and a uid belongs to one Job (not to one created again
    under the same name)."""
    uid = ((job or {}).get("metadata") or {}).get("uid")
    if not uid:
        return []
    pods = []
    for child in children:
        owner = controller_of(child) if child.get("kind") == "Pod" else None
        if owner and (owner.get("apiVersion"), owner.get("kind"), owner.get("uid")) == (
            "batch/v1", "Job", uid
        ):
            pods.append(child)
    return pods


def stale_children(children: Sequence[Mapping[str, Any]], generation: int) -> list[ChildRef]:
    """Training children of other generations, named from the old trainer Job's generation;
    that Job is deleted last, so a pass that stops half-way repeats the cleanup."""
    stale = []
    for job in of_component(children, "Job", naming.COMPONENT_TRAINER):
        old = generation_of(job)
        if old is None or old == generation:
            continue
        owner = labels_of(job).get(naming.LABEL_JOB, "")
        stale += [
            ChildRef("v1", "ConfigMap", naming.config_map_name(owner, old)),
            ChildRef("v1", "Service", naming.rendezvous_service_name(owner, old)),
            ChildRef("batch/v1", "Job", naming.export_job_name(owner, old)),
            ChildRef("batch/v1", "Job", job["metadata"]["name"]),
        ]
    for job in of_component(children, "Job", naming.COMPONENT_EXPORTER):
        old = generation_of(job)
        if old is not None and old != generation:
            stale.append(ChildRef("batch/v1", "Job", job["metadata"]["name"]))
    return list(dict.fromkeys(stale))
