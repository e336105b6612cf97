"""The generated CRD on a real API server: examples accepted, bad manifests refused at
`kubectl apply` with a message that names the field, printer columns shown."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.codegen.crd import dump_yaml, render_crd
from tests.cases.manifests import INVALID_CASES, InvalidCase, base_manifest
from tests.cases.names import (
    EXTENDED_BAD,
    EXTENDED_GOOD,
    LABEL_VALUES,
    NATIVE_RESOURCES,
    QUALIFIED_BAD,
    QUALIFIED_GOOD,
)

ROOT = Path(__file__).parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def crd(cluster: Any) -> None:
    cluster.kubectl("apply", "--server-side", "-f", "-", input=render_crd())
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd/finetunejobs.kubetune.io", "--timeout=60s"
    )


def apply(cluster: Any, manifest: dict[str, Any], namespace: str, *extra: str) -> Any:
    return cluster.kubectl(
        "apply", "--server-side", "-n", namespace, *extra, "-f", "-",
        input=dump_yaml(manifest), check=False,
    )


def test_committed_crd_applies_server_side(cluster: Any, crd: None) -> None:
    result = cluster.kubectl(
        "apply", "--server-side", "-f", str(ROOT / "crds" / "kubetune.io_finetunejobs.yaml")
    )
    assert "finetunejobs.kubetune.io" in result.stdout
    resources = cluster.kubectl("api-resources", "--api-group=kubetune.io", "-o", "wide").stdout
    assert "ftj" in resources and "kubetune" in resources


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_example_is_accepted(cluster: Any, crd: None, namespace: str, path: Path) -> None:
    result = cluster.kubectl(
        "apply", "--server-side", "--dry-run=server", "-n", namespace, "-f", str(path),
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("case", INVALID_CASES, ids=lambda case: case.id)
def test_invalid_manifest_is_refused(
    cluster: Any, crd: None, namespace: str, case: InvalidCase
) -> None:
    result = apply(cluster, case.manifest(), namespace)
    assert result.returncode != 0, f"{case.id} was accepted"
    assert case.field in result.stderr, result.stderr
    assert cluster.get("ftj", case.manifest()["metadata"]["name"], namespace) is None


def test_defaults_are_applied_by_the_api_server(cluster: Any, crd: None, namespace: str) -> None:
    result = apply(cluster, base_manifest("defaults"), namespace)
    assert result.returncode == 0, result.stderr
    spec = cluster.get("ftj", "defaults", namespace)["spec"]
    # Only fields the user or the API server set appear; these come from CRD defaults.
    assert spec["method"] == "LoRA"
    assert spec["model"]["trustRemoteCode"] is False
    assert spec["dataset"]["format"] == "Auto"


def test_printer_columns(cluster: Any, crd: None, namespace: str) -> None:
    assert apply(cluster, base_manifest("columns"), namespace).returncode == 0
    status = {"status": {"phase": "Training", "progress": {"percent": 40, "trainLoss": "1.23"},
                         "serving": {"endpoint": "http://columns.ns.svc:8000/v1"}}}
    cluster.kubectl(
        "patch", "ftj", "columns", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps(status),
    )
    table = cluster.kubectl("get", "ftj", "-n", namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "PHASE", "PROGRESS", "LOSS", "ENDPOINT", "AGE"]
    row = next(line for line in table if line.startswith("columns"))
    assert row.split()[1:5] == ["Training", "40", "1.23", "http://columns.ns.svc:8000/v1"]
    wide = cluster.kubectl("get", "finetunejobs.kubetune.io", "-n", namespace, "-o", "wide")
    assert "METHOD" in wide.stdout and "builtin://smollm2-135m-instruct" in wide.stdout


def _verdicts(cluster: Any, namespace: str, objects: list[dict[str, Any]]) -> list[bool]:
    """Whether the API server accepts each object (one server-side dry run for all of them)."""
    result = cluster.kubectl(
        "apply", "--server-side", "--dry-run=server", "-n", namespace, "-f", "-",
        input="\n---\n".join(json.dumps(obj) for obj in objects), check=False,
    )
    return [f'"{obj["metadata"]["name"]}"' not in result.stderr for obj in objects]


def _pod(name: str, node_selector: dict[str, str], limits: dict[str, str]) -> dict[str, Any]:
    container = {"name": "c", "image": "example.invalid/x", "resources": {"limits": limits}}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [container], "nodeSelector": node_selector},
    }


def _job(name: str, resources: dict[str, Any]) -> dict[str, Any]:
    manifest = base_manifest(name)
    manifest["spec"]["resources"] = resources
    return manifest


def test_crd_and_pods_agree_on_label_keys_values_and_extended_resources(
    cluster: Any, crd: None, namespace: str
) -> None:
    """Whatever the CRD accepts in nodeSelector and gpuResource, the API server accepts in the
    trainer pods, and the CRD refuses only what Kubernetes refuses (Kubernetes' own test values
    around every bound, tests/cases/names.py)."""
    cases = [("key", key, key in QUALIFIED_GOOD) for key in QUALIFIED_GOOD + QUALIFIED_BAD]
    cases += [("value", value, None) for value in LABEL_VALUES]  # None: as the pods say
    cases += [("gpu", name, name in EXTENDED_GOOD) for name in EXTENDED_GOOD + EXTENDED_BAD]
    jobs, pods = [], []
    for i, (what, value, _) in enumerate(cases):
        selector = {value: "x"} if what == "key" else {"example.com/k": value}
        if what == "gpu":
            jobs.append(_job(f"case-{i}", {"gpuResource": value}))
            pods.append(_pod(f"case-{i}", {}, {value: "1"}))
        else:
            jobs.append(_job(f"case-{i}", {"nodeSelector": selector}))
            pods.append(_pod(f"case-{i}", selector, {}))
    crd_says = _verdicts(cluster, namespace, jobs)
    pod_says = _verdicts(cluster, namespace, pods)
    for (what, value, expected), crd_ok, pod_ok in zip(cases, crd_says, pod_says, strict=True):
        if expected is not None:
            assert crd_ok is expected, (what, value)
        # The pods agree wherever the rule is Kubernetes' (native resources such as `cpu` are
        # valid in a pod but are not a GPU's extended resource).
        if value not in NATIVE_RESOURCES:
            assert pod_ok is crd_ok, (what, value, "pod accepted" if pod_ok else "pod refused")
