"""The generated CRD on a real API server: examples accepted, bad manifests refused at
`kubectl apply` with a message that names the field, printer columns shown."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.codegen.crd import dump_yaml, render_crd
from tests.cases.manifests import INVALID_CASES, InvalidCase, base_manifest

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
