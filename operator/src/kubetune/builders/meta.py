"""Metadata every child shares: owner reference, labels, the applied-hash annotation."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubetune.api import API_VERSION, KIND, FineTuneJobSpec
from kubetune.api.spec import EvaluationSpec
from kubetune.builders import naming
from kubetune.builders.config import OperatorConfig

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Owner:
    """The FineTuneJob a child belongs to: what builders need from its metadata."""

    name: str
    namespace: str
    uid: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Owner:
        meta = body["metadata"]
        return cls(
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta["uid"],
            labels=dict(meta.get("labels") or {}),
            annotations=dict(meta.get("annotations") or {}),
        )

    def owner_reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def labels(owner: Owner, component: str, generation: int | None) -> dict[str, str]:
    result = {
        naming.LABEL_NAME: naming.APP_NAME,
        naming.LABEL_INSTANCE: owner.name,
        naming.LABEL_COMPONENT: component,
        naming.LABEL_MANAGED_BY: naming.MANAGED_BY,
        naming.LABEL_JOB: owner.name,
    }
    if generation is not None:
        result[naming.LABEL_GENERATION] = str(generation)
    return result


def selector_labels(owner: Owner, component: str) -> dict[str, str]:
    """The stable subset used in selectors (selectors of Deployments are immutable)."""
    return {
        naming.LABEL_INSTANCE: owner.name,
        naming.LABEL_COMPONENT: component,
        naming.LABEL_JOB: owner.name,
    }


def metadata(
    owner: Owner,
    name: str,
    component: str,
    generation: int | None,
    *,
    extra_labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": owner.namespace,
        "labels": {**labels(owner, component, generation), **(extra_labels or {})},
        "ownerReferences": [owner.owner_reference()],
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def manifest_hash(manifest: Manifest) -> str:
    """sha256 of the manifest without its own hash annotation (key order does not matter)."""
    annotations = dict(manifest.get("metadata", {}).get("annotations") or {})
    annotations.pop(naming.ANNOTATION_HASH, None)
    stripped = {**manifest, "metadata": {**manifest["metadata"], "annotations": annotations}}
    return hashlib.sha256(json.dumps(stripped, sort_keys=True).encode()).hexdigest()[:16]


def with_hash(manifest: Manifest) -> Manifest:
    """The manifest carrying the hash of itself, so an unchanged child is never re-applied."""
    digest = manifest_hash(manifest)
    meta = manifest["metadata"]
    meta["annotations"] = {**(meta.get("annotations") or {}), naming.ANNOTATION_HASH: digest}
    return manifest


def with_job_hash(manifest: Manifest) -> Manifest:
    """A Job carrying the hash of what can still change on it once it exists: its metadata
    and spec, pod template left out. A Job's pod template is immutable, so a template-only
    difference (a renamed Secret, a new trainer image, pod-metadata overrides) could only be
    refused by the API server: it reaches the next Job built instead (a new generation, the
    export Job, a Job recreated after deletion), and the running one is left alone."""
    spec = {k: v for k, v in manifest["spec"].items() if k != "template"}
    digest = manifest_hash({**manifest, "spec": spec})
    meta = manifest["metadata"]
    meta["annotations"] = {**(meta.get("annotations") or {}), naming.ANNOTATION_HASH: digest}
    return manifest


def training_hash(spec: FineTuneJobSpec) -> str:
    """Identity of the trained model: a spec change that alters it starts a new generation
    (a new training Job and run directory, from step 0); every other change applies in place.

    The fields are listed one by one rather than "the spec minus a few": a field added to
    the spec later starts no new generation until someone decides it changes the model.

    In the hash (a change trains a different model, or cannot reach the running world):
    - model: source, revision, trustRemoteCode, parameterCount (the planner's memory input:
      it can change the micro-batch split);
    - dataset: source, format, validation (a split changes which records are trained on; the
      validation set decides the eval loss the report and the gate read);
    - method, lora (defaults spelled out: writing the default values down is no change) and
      every `training` hyperparameter except the two cadences below;
    - resources and deepspeed. The global batch is the spec's (`batchSize`), so more GPUs do
      not change the effective batch, but they change the plan: micro-batch and gradient
      accumulation split, ZeRO stage and partitioning, the order of the all-reduce sums.
      They are also the torchrun world and the pods' requests and placement in the Job's
      pod template, which is immutable: nothing short of a new Job can apply them;
    - storage.claimName: the run directory and its checkpoints live on that claim;
    - serving.precision and serving.device: they decide the exported model;
    - evaluation, but for the judge's Secret: the task, labels, metrics and judge decide what
      the trainer measures and the gate reads, and only a run measures them (a new gate bound
      on a metric the last run did not measure would otherwise fail as unmeasured). Absent
      while it is the default, so specs from before the field keep their hash.

    Applied in place, no new generation:
    - training.logEverySteps, training.evalEverySteps, checkpoint.everySteps, checkpoint.keep:
      how the run is observed and stored. They reach the trainer only through the
      generation's run ConfigMap, which is updated in place; the trainer reads it when a pod
      starts, so they take effect at the generation's next pod (a retry, a resume after
      suspend). The running pod is never restarted for them;
    - model.secretRef, dataset.secretRef, evaluation.judge.apiKeySecretRef: credentials, not
      the model. A container reads its Secret when it starts, so a rotated value under the
      same name reaches the next pod with no spec change; a renamed Secret reaches the next
      pods built from a new template (the export Job, a later generation), as the training
      Job's template is immutable (see `with_job_hash`);
    - storage.size and storageClassName (the PVC, one per FineTuneJob whatever the
      generation: a new generation would not change them either), suspend,
      activeDeadlineSeconds (fields of the live Job) and the rest of serving.
    """
    model = spec.model
    dataset = spec.dataset
    training = spec.training.to_wire()
    for cadence in ("logEverySteps", "evalEverySteps"):
        training.pop(cadence, None)
    identity = {
        "model": {
            "source": model.source,
            "revision": model.revision,
            "trustRemoteCode": model.trust_remote_code,
            "parameterCount": model.parameter_count,
        },
        "dataset": {
            "source": dataset.source,
            "format": dataset.format.value,
            "validation": dataset.validation.to_wire() if dataset.validation else None,
        },
        "method": spec.method.value,
        "lora": spec.lora_or_default.to_wire() if spec.method.uses_adapter else None,
        "training": training,
        "resources": spec.resources.to_wire(),
        "deepspeed": spec.deepspeed.to_wire(),
        "storage": {"claimName": spec.storage.claim_name},
        "export": export_identity(spec),
    }
    if spec.evaluation != EvaluationSpec():
        evaluation = spec.evaluation.to_wire()
        (evaluation.get("judge") or {}).pop("apiKeySecretRef", None)
        identity["evaluation"] = evaluation
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def export_identity(spec: FineTuneJobSpec) -> dict[str, str]:
    """What decides the exported model. `quantization` only when set, so a spec without it
    keeps the hash it had before the field existed (no rerun on upgrade)."""
    serving = spec.serving
    identity = {"precision": serving.precision.value, "device": serving.device.value}
    if serving.quantization is not None:
        identity["quantization"] = serving.quantization.value
    return identity


def legacy_training_hash(spec: FineTuneJobSpec) -> str:
    """The training hash operators before the split above wrote on their Jobs (nearly the
    whole spec). A Job carrying it still matches its spec, so upgrading the operator does not
    start every running FineTuneJob over; the next apply rewrites the annotation."""
    wire = spec.to_wire()
    wire.pop("suspend", None)
    wire.pop("activeDeadlineSeconds", None)
    serving = wire.pop("serving", {})
    wire["export"] = {key: serving.get(key) for key in ("precision", "device")}
    return hashlib.sha256(json.dumps(wire, sort_keys=True).encode()).hexdigest()[:16]


def pod_metadata_overrides(
    owner: Owner, component: str, config: OperatorConfig
) -> tuple[dict[str, str], dict[str, str]]:
    """Extra (labels, annotations) for pods of `component` ("train", "export", "serve").

    Only with `--allow-pod-metadata`: the e2e tests use it to tell kwok how each fake pod ends.
    A malformed annotation is ignored rather than blocking the job. User labels may add to a
    pod's labels, never replace KubeTune's own: a label under a reserved prefix is dropped
    here, so a caller that merges these over KubeTune's labels cannot be made to relabel a
    pod as another job's trainer (selectors, indexes and the progress endpoint read them).
    """
    raw = owner.annotations.get(naming.ANNOTATION_POD_METADATA)
    if not config.allow_pod_metadata or not raw:
        return {}, {}
    try:
        section = json.loads(raw).get(component) or {}
        extra_labels = {
            str(k): str(v)
            for k, v in (section.get("labels") or {}).items()
            if not reserved_label(str(k))
        }
        extra_annotations = {str(k): str(v) for k, v in (section.get("annotations") or {}).items()}
    except (ValueError, AttributeError):
        return {}, {}
    return extra_labels, extra_annotations


RESERVED_LABEL_PREFIXES = ("kubetune.io/", "app.kubernetes.io/")
"""Label prefixes KubeTune sets on its children (`labels()`): never taken from user metadata."""


def reserved_label(key: str) -> bool:
    """Whether `key` is a label only KubeTune may set on its pods. Pure."""
    return key.startswith(RESERVED_LABEL_PREFIXES)
