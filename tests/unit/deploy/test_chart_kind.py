"""kind-config.yaml and docs/kind.md: the cluster shape and the walkthrough's commands match
the chart, the quickstart and the operator's names (no Docker here to run kind itself)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[3]
KIND_CONFIG = ROOT / "kind-config.yaml"
KIND_DOC = ROOT / "docs" / "kind.md"
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


def test_kind_cluster_has_a_control_plane_a_cpu_and_a_tainted_gpu_worker() -> None:
    config = yaml.safe_load(KIND_CONFIG.read_text())
    assert config["kind"] == "Cluster"
    assert config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    roles = [node["role"] for node in config["nodes"]]
    assert roles == ["control-plane", "worker", "worker"]
    gpu = config["nodes"][2]
    assert gpu["labels"]["nvidia.com/gpu.present"] == "true"
    [patch] = [yaml.safe_load(p) for p in gpu["kubeadmConfigPatches"]]
    assert patch["kind"] == "JoinConfiguration"
    assert patch["nodeRegistration"]["taints"] == [
        {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
    ]
    assert "kubeadmConfigPatches" not in config["nodes"][1]


def test_walkthrough_uses_the_real_names() -> None:
    doc = KIND_DOC.read_text()
    job = yaml.safe_load(QUICKSTART.read_text())
    name = job["metadata"]["name"]
    assert job["spec"]["resources"]["gpusPerNode"] == 0, "the kind walkthrough trains on CPUs"
    assert "kind create cluster --config kind-config.yaml" in doc
    assert "helm install kubetune charts/kubetune" in doc
    assert "kubectl apply -f examples/quickstart.yaml" in doc
    assert f"kubectl wait --for=condition=Ready ftj/{name}" in doc
    assert re.search(r"curl -s localhost:8000/v1/chat/completions", doc)
    for dockerfile in ("operator/Dockerfile", "trainer-image/Dockerfile"):
        assert f"docker build -f {dockerfile}" in doc
        assert (ROOT / dockerfile).is_file()
    values = yaml.safe_load((ROOT / "charts" / "kubetune" / "values.yaml").read_text())
    for image in (values["operator"]["image"], values["trainer"]["image"]):
        assert f"{image['repository']}:{image['tag']}" in doc, "kind load must match values"
