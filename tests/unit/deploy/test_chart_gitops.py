"""The GitOps path: the Argo CD health check (run under Lua 5.1, Argo CD's dialect), the
examples/gitops layout (kustomize overlays rendered and validated as FineTuneJobs), and the
docs that quote them.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api import parse_finetunejob

ROOT = Path(__file__).resolve().parents[3]
GITOPS = ROOT / "examples" / "gitops"
HEALTH_LUA = ROOT / "docs" / "argocd-health.lua"
GITOPS_DOC = ROOT / "docs" / "gitops.md"


def argocd_health(obj: dict[str, Any]) -> dict[str, str]:
    """Run docs/argocd-health.lua as Argo CD does: `obj` in scope, a table returned."""
    lua51 = pytest.importorskip("lupa.lua51", reason="lupa (Lua 5.1 for Python)")
    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)

    def to_lua(value: Any) -> Any:
        if isinstance(value, dict):
            return runtime.table_from({k: to_lua(v) for k, v in value.items()})
        if isinstance(value, list):
            return runtime.table_from([to_lua(v) for v in value])
        return value

    check = runtime.eval("function(obj) " + HEALTH_LUA.read_text() + "\nend")
    result = check(to_lua(obj))
    return {"status": result["status"], "message": result["message"]}


def job(
    generation: int = 2,
    observed: int | None = 2,
    conditions: list[dict[str, Any]] | None = None,
    phase: str | None = None,
    suspend: bool = False,
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "j", "namespace": "ns", "generation": generation},
        "spec": {"suspend": suspend},
    }
    if observed is not None:
        obj["status"] = {"observedGeneration": observed, "conditions": conditions or []}
        if phase:
            obj["status"]["phase"] = phase
    return obj


def cond(kind: str, status: str, reason: str, generation: int = 2) -> dict[str, Any]:
    return {"type": kind, "status": status, "reason": reason, "message": f"{kind} {reason}",
            "observedGeneration": generation}


VALID = cond("Validated", "True", "Valid")


@pytest.mark.parametrize(
    ("obj", "status"),
    [
        (job(observed=None), "Progressing"),
        (job(observed=1, conditions=[VALID, cond("Ready", "True", "Serving", 1)]), "Progressing"),
        (job(conditions=[VALID, cond("Ready", "True", "Serving", 1)]), "Progressing"),
        (job(conditions=[VALID, cond("Ready", "True", "Serving")], phase="Succeeded"), "Healthy"),
        (job(conditions=[VALID, cond("Ready", "False", "Training")], phase="Training"),
         "Progressing"),
        (job(conditions=[cond("Validated", "False", "SecretNotFound"),
                         cond("Ready", "False", "Invalid")], phase="Invalid"), "Degraded"),
        (job(conditions=[VALID, cond("Ready", "False", "TrainingFailed")], phase="Failed"),
         "Degraded"),
        (job(conditions=[VALID, cond("Ready", "False", "ExportFailed")]), "Degraded"),
        (job(conditions=[VALID, cond("Ready", "False", "GateFailed")]), "Degraded"),
        (job(conditions=[VALID, cond("Ready", "True", "Trained")], phase="Succeeded"),
         "Healthy"),
        (job(conditions=[VALID, cond("Ready", "False", "Suspended")], phase="Suspended",
             suspend=True), "Suspended"),
    ],
    ids=["no-status", "stale-status", "stale-ready", "ready", "training", "invalid",
         "failed-phase", "failed-reason", "gate-failed", "trained-no-serving", "suspended"],
)
def test_argocd_health_check(obj: dict[str, Any], status: str) -> None:
    health = argocd_health(obj)
    assert health["status"] == status
    assert health["message"]


def test_gitops_doc_quotes_the_health_check_verbatim() -> None:
    doc = GITOPS_DOC.read_text()
    block = doc.split("resource.customizations.health.kubetune.io_FineTuneJob: |\n", 1)[1]
    block = block.split("```", 1)[0]
    quoted = "\n".join(line[6:] if line.strip() else "" for line in block.splitlines())
    assert quoted.strip() == HEALTH_LUA.read_text().strip()


# --------------------------------------------------------------------------- layout


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kubectl_binary() -> str | None:
    override = os.environ.get("KUBETUNE_CONTROLPLANE_BIN")
    candidates = [Path(override)] if override else sorted(
        (Path.home() / ".cache" / "kubetune").glob("controlplane-*/bin")
    )
    for directory in candidates:
        if os.access(directory / "kubectl", os.X_OK):
            return str(directory / "kubectl")
    return None


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_overlays_render_to_valid_finetunejobs(overlay: str) -> None:
    kubectl = kubectl_binary()
    if kubectl is None:
        pytest.skip("no kubectl (with kustomize) built by hack/build-control-plane.sh")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(GITOPS / "kustomize" / "overlays" / overlay)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    [manifest] = [d for d in yaml.safe_load_all(rendered) if d]
    parsed = parse_finetunejob(manifest, f"overlay {overlay}")
    assert manifest["metadata"]["namespace"] == f"ml-{overlay}"
    assert "suspend" not in manifest["spec"], "Git should not own spec.suspend (docs/gitops.md)"
    if overlay == "dev":
        assert parsed.spec.resources.gpus_per_node == 0
    else:
        assert parsed.spec.resources.gpus_per_node >= 1
        assert manifest["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"


def test_argocd_applications_point_at_real_paths_and_ignore_suspend_drift() -> None:
    apps = {d["metadata"]["name"]: d for p in (GITOPS / "argocd").glob("*.yaml")
            for d in documents(p)}
    assert set(apps) == {"kubetune-operator", "finetunejobs-prod"}
    for app in apps.values():
        assert app["apiVersion"] == "argoproj.io/v1alpha1" and app["kind"] == "Application"
        assert (ROOT / app["spec"]["source"]["path"]).is_dir()
    operator = apps["kubetune-operator"]
    assert operator["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"] == "-1"
    assert "ServerSideApply=true" in operator["spec"]["syncPolicy"]["syncOptions"]
    jobs = apps["finetunejobs-prod"]
    assert {"group": "kubetune.io", "kind": "FineTuneJob", "jsonPointers": ["/spec/suspend"]} in (
        jobs["spec"]["ignoreDifferences"]
    )
    assert "RespectIgnoreDifferences=true" in jobs["spec"]["syncPolicy"]["syncOptions"]


def test_flux_layout_orders_operator_before_jobs_and_waits_on_health() -> None:
    kustomizations = {d["metadata"]["name"]: d
                      for d in documents(GITOPS / "flux" / "clusters" / "prod.yaml")}
    assert set(kustomizations) == {"kubetune-operator", "finetunejobs-prod"}
    for kustomization in kustomizations.values():
        assert (ROOT / kustomization["spec"]["path"]).is_dir()
        assert kustomization["spec"]["wait"] is True
    assert kustomizations["finetunejobs-prod"]["spec"]["dependsOn"] == [
        {"name": "kubetune-operator"}
    ]
    infrastructure = {d["kind"]: d for d in documents(GITOPS / "flux" / "infrastructure" /
                                                      "kubetune.yaml")}
    release = infrastructure["HelmRelease"]
    assert (ROOT / release["spec"]["chart"]["spec"]["chart"]).is_dir()
    assert release["spec"]["upgrade"]["crds"] == "CreateReplace"


def test_no_gitops_example_pulls_latest() -> None:
    for path in GITOPS.rglob("*.yaml"):
        assert not re.search(r"(tag: *\"?latest|:latest\b)", path.read_text()), path
