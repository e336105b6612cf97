"""`--allow-pod-metadata`: user labels add to KubeTune's pod labels, never replace them."""

from __future__ import annotations

import json
from typing import Any

from kubetune.api import FineTuneJobSpec
from kubetune.builders import naming
from kubetune.builders.export import export_job
from kubetune.builders.meta import Owner, pod_metadata_overrides, training_hash
from kubetune.builders.serving import serving_deployment
from kubetune.builders.training import training_job
from tests.unit.operator_fixtures import CONFIG, body, spec_dict

FORGED = {
    naming.LABEL_JOB: "victim",
    naming.LABEL_GENERATION: "99",
    naming.LABEL_COMPONENT: "trainer",
    naming.LABEL_INSTANCE: "victim",
    naming.LABEL_MANAGED_BY: "someone",
    "kubetune.io/anything": "x",
    "fail.stage.kwok.x-k8s.io": "true",  # what the e2e tests really set: still honoured
}


def _owner() -> Owner:
    section = {"labels": FORGED, "annotations": {"kubetune.io/fake-termination-message": "{}"}}
    metadata = json.dumps({"train": section, "export": section, "serve": section})
    return Owner.from_body(body(annotations={naming.ANNOTATION_POD_METADATA: metadata}))


def _template_labels(manifest: dict[str, Any]) -> dict[str, str]:
    return dict(manifest["spec"]["template"]["metadata"]["labels"])


def test_user_labels_never_override_kubetunes_on_any_pod() -> None:
    owner = _owner()
    spec = FineTuneJobSpec.model_validate(spec_dict())
    pods = {
        naming.COMPONENT_TRAINER: training_job(owner, 1, spec, CONFIG, training_hash(spec)),
        naming.COMPONENT_EXPORTER: export_job(owner, 1, spec, CONFIG),
        naming.COMPONENT_SERVER: serving_deployment(owner, 1, None, spec, CONFIG),
    }
    for component, manifest in pods.items():
        labels = _template_labels(manifest)
        assert labels[naming.LABEL_JOB] == "demo", component
        assert labels[naming.LABEL_INSTANCE] == "demo", component
        assert labels[naming.LABEL_COMPONENT] == component
        assert labels[naming.LABEL_MANAGED_BY] == naming.MANAGED_BY
        assert labels[naming.LABEL_GENERATION] == "1"
        assert "kubetune.io/anything" not in labels
        # Labels KubeTune does not set are still added, and annotations still pass.
        assert labels["fail.stage.kwok.x-k8s.io"] == "true"
        annotations = manifest["spec"]["template"]["metadata"]["annotations"]
        assert annotations["kubetune.io/fake-termination-message"] == "{}"


def test_reserved_labels_are_dropped_from_the_overrides() -> None:
    labels, _ = pod_metadata_overrides(_owner(), "train", CONFIG)
    assert labels == {"fail.stage.kwok.x-k8s.io": "true"}
