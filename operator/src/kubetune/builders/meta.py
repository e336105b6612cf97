"""Metadata every child shares: owner reference, labels, the applied-hash annotation."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubetune.api import API_VERSION, KIND, FineTuneJobSpec
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


def training_hash(spec: FineTuneJobSpec) -> str:
    """Identity of a training run: a spec change that alters it starts a new generation.

    Left out: `suspend` (a suspended run resumes the same generation), `activeDeadlineSeconds`
    (mutable on the Job) and the serving settings that do not change the exported model.
    """
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
    A malformed annotation is ignored rather than blocking the job.
    """
    raw = owner.annotations.get(naming.ANNOTATION_POD_METADATA)
    if not config.allow_pod_metadata or not raw:
        return {}, {}
    try:
        section = json.loads(raw).get(component) or {}
        extra_labels = {str(k): str(v) for k, v in (section.get("labels") or {}).items()}
        extra_annotations = {str(k): str(v) for k, v in (section.get("annotations") or {}).items()}
    except (ValueError, AttributeError):
        return {}, {}
    return extra_labels, extra_annotations
