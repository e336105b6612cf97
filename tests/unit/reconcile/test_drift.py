"""The drift decision (issue 13, finding 6): a child is applied when it is missing, when
KubeTune's manifest changed, or when someone changed what KubeTune sets on it; fields the API
server fills in are not drift. Pure: the observed objects below are written as the API server
returns them (defaults filled in, quantities canonical)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubetune.api import FineTuneJobSpec
from kubetune.builders.meta import Owner
from kubetune.builders.serving import serving_deployment, serving_service
from kubetune.builders.training import artifacts_claim, rendezvous_service, run_config_map
from kubetune.reconcile.drift import drifted, observed_view, quantity, should_apply
from tests.unit.operator_fixtures import CONFIG, body, plan, spec_dict

OWNER = Owner.from_body(body())
SPEC = FineTuneJobSpec.model_validate(
    spec_dict(serving={"resources": {"cpu": "0.5", "memory": "1024Mi"}})
)


def _deployment() -> dict[str, Any]:
    return serving_deployment(OWNER, 1, "1.05", SPEC, CONFIG)


def _as_stored(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the API server returns for `manifest`: server-side defaults added, quantities
    in canonical form, empty fields dropped; then what the index keeps of it."""
    stored = copy.deepcopy(manifest)
    stored["metadata"].update(uid="u", resourceVersion="7", generation=1)
    kind = stored["kind"]
    if kind == "Deployment":
        spec = stored["spec"]
        spec.update(revisionHistoryLimit=10, progressDeadlineSeconds=600)
        pod = spec["template"]["spec"]
        pod.update(dnsPolicy="ClusterFirst", schedulerName="default-scheduler",
                   serviceAccount=pod.get("serviceAccountName", "default"))  # fmt: skip
        for volume in pod["volumes"]:
            claim = volume.get("persistentVolumeClaim")
            if claim is not None and claim.get("readOnly") is False:
                del claim["readOnly"]  # omitempty
        [container] = pod["containers"]
        container["terminationMessagePath"] = "/dev/termination-log"
        container.setdefault("terminationMessagePolicy", "File")  # defaulted only when unset
        container["ports"][0]["protocol"] = "TCP"
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            container[probe].update(timeoutSeconds=1, successThreshold=1)
            container[probe]["httpGet"]["scheme"] = "HTTP"
        container["resources"] = {
            "requests": {"cpu": "500m", "memory": "1Gi"},
            "limits": {"cpu": "500m", "memory": "1Gi"},
        }
        stored["status"] = {"readyReplicas": 1}
    if kind == "Service":
        stored["spec"].update(clusterIPs=["10.0.0.7"], ipFamilies=["IPv4"],
                              sessionAffinity="None", internalTrafficPolicy="Cluster")  # fmt: skip
        stored["spec"].setdefault("clusterIP", "10.0.0.7")
        for port in stored["spec"]["ports"]:
            port.setdefault("protocol", "TCP")
            port.setdefault("targetPort", port["port"])
    if kind == "PersistentVolumeClaim":
        stored["spec"].update(volumeMode="Filesystem", volumeName="pv-1")
    return observed_view(stored, kind, stored["apiVersion"])


def _children() -> list[dict[str, Any]]:
    return [
        _deployment(),
        serving_service(OWNER),
        rendezvous_service(OWNER, 1),
        run_config_map(OWNER, 1, SPEC, plan(), {}),
        artifacts_claim(OWNER, SPEC, CONFIG),
    ]


@pytest.mark.parametrize("desired", _children(), ids=lambda m: m["kind"])
def test_what_the_server_fills_in_is_not_drift(desired: dict[str, Any]) -> None:
    assert not drifted(desired, _as_stored(desired))
    assert not should_apply(desired, _as_stored(desired))


@pytest.mark.parametrize("desired", _children(), ids=lambda m: m["kind"])
def test_a_missing_child_is_applied(desired: dict[str, Any]) -> None:
    assert should_apply(desired, None)


def test_a_new_image_set_by_hand_is_drift() -> None:
    desired = _deployment()
    observed = _as_stored(desired)
    observed["spec"]["template"]["spec"]["containers"][0]["image"] = "other:tag"
    assert drifted(desired, observed) and should_apply(desired, observed)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda d: d["spec"].update(replicas=5), id="replicas"),
        pytest.param(
            lambda d: d["spec"]["template"]["spec"]["containers"][0]["env"].pop(), id="env var"
        ),
        pytest.param(
            lambda d: d["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"].update(
                cpu="4"
            ),
            id="cpu limit",
        ),
        pytest.param(
            lambda d: d["spec"]["template"]["spec"].update(automountServiceAccountToken=True),
            id="token automount",
        ),
        pytest.param(
            lambda d: d["metadata"]["labels"].pop("kubetune.io/job"), id="label removed"
        ),
        pytest.param(
            lambda d: d["spec"]["strategy"]["rollingUpdate"].update(maxUnavailable=1),
            id="maxUnavailable",
        ),
    ],
)
def test_edits_to_what_kubetune_sets_on_the_deployment_are_drift(edit: Any) -> None:
    desired = _deployment()
    observed = _as_stored(desired)
    edit(observed)
    assert drifted(desired, observed)


def test_additions_by_others_are_not_drift() -> None:
    desired = _deployment()
    observed = _as_stored(desired)
    template = observed["spec"]["template"]
    template["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"] = "now"
    observed["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = "3"
    assert not drifted(desired, observed)


def test_service_and_config_map_edits_are_drift() -> None:
    service = serving_service(OWNER)
    observed = _as_stored(service)
    observed["spec"]["selector"] = {"app": "someone-else"}
    assert drifted(service, observed)
    config_map = run_config_map(OWNER, 1, SPEC, plan(), {})
    observed = _as_stored(config_map)
    observed["data"]["run.json"] = "{}"
    assert drifted(config_map, observed)


def test_a_claims_spec_is_not_reverted_but_its_labels_are() -> None:
    claim = artifacts_claim(OWNER, SPEC, CONFIG)
    observed = _as_stored(claim)
    observed["spec"]["resources"] = {"requests": {"storage": "500Gi"}}  # grown by hand
    assert not drifted(claim, observed)
    observed["metadata"]["labels"].pop("app.kubernetes.io/component")
    assert drifted(claim, observed)


def test_a_jobs_template_is_never_drift() -> None:
    job: dict[str, Any] = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "j", "annotations": {"kubetune.io/applied-hash": "h"}},
        "spec": {"suspend": False, "template": {"spec": {"containers": [{"name": "t"}]}}},
    }
    observed = copy.deepcopy(job)
    observed["spec"]["suspend"] = True  # Kueue's to flip
    observed["spec"]["template"]["spec"]["containers"][0]["image"] = "other"
    assert not should_apply(job, observed)
    observed["metadata"]["annotations"]["kubetune.io/applied-hash"] = "old"
    assert should_apply(job, observed)


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [("500m", "0.5", True), ("1Gi", "1024Mi", True), ("2", "2000m", True),
     ("1e3", "1k", True), ("1G", "1Gi", False), ("100m", "1", False)],
)  # fmt: skip
def test_quantities_compare_by_value(a: str, b: str, same: bool) -> None:
    assert (quantity(a) == quantity(b)) is same
