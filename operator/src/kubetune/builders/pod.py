"""Pod pieces shared by the trainer, exporter and server: security, volumes, secrets."""

from __future__ import annotations

from typing import Any

from kubetune.api import FineTuneJobSpec
from kubetune.api.dataplane import DATASET_TOKEN_ENV, MODEL_TOKEN_ENV
from kubetune.api.spec import Device
from kubetune.builders import naming
from kubetune.builders.config import OperatorConfig

ARTIFACTS_VOLUME = "artifacts"
TMP_VOLUME = "tmp"


def pod_security_context(config: OperatorConfig) -> dict[str, Any]:
    """The pod half of the `restricted` Pod Security Standard; fsGroup makes the PVC writable."""
    return {
        "runAsNonRoot": True,
        "runAsUser": config.run_as_user,
        "runAsGroup": config.run_as_user,
        "fsGroup": config.run_as_user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def artifacts_claim(spec: FineTuneJobSpec, job: str) -> str:
    return spec.storage.claim_name or naming.artifacts_claim_name(job)


def artifacts_volume(claim: str, read_only: bool = False) -> dict[str, Any]:
    return {
        "name": ARTIFACTS_VOLUME,
        "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only},
    }


def tmp_volume() -> dict[str, Any]:
    # Data-plane processes write caches under $HOME; the image's root filesystem is not theirs.
    return {"name": TMP_VOLUME, "emptyDir": {}}


def tmp_mount() -> dict[str, Any]:
    return {"name": TMP_VOLUME, "mountPath": "/tmp"}


def pvc_claims(spec: FineTuneJobSpec) -> list[str]:
    """Claims named by `pvc://claim/path` model or dataset sources, in a stable order."""
    sources = [spec.model.source, spec.dataset.source]
    if spec.dataset.validation and spec.dataset.validation.source:
        sources.append(spec.dataset.validation.source)
    claims = [s.removeprefix("pvc://").split("/", 1)[0] for s in sources if s.startswith("pvc://")]
    return sorted(set(claims))


def pvc_source_volumes(spec: FineTuneJobSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts) for `pvc://` sources: each claim read-only at /mnt/pvc/<claim>."""
    volumes, mounts = [], []
    for index, claim in enumerate(pvc_claims(spec)):
        name = f"source-{index}"
        volumes.append(
            {"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        )
        mounts.append(
            {"name": name, "mountPath": f"{naming.PVC_MOUNT_ROOT}/{claim}", "readOnly": True}
        )
    return volumes, mounts


def secret_env(spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    """Tokens as `secretKeyRef` env vars only: the value never passes through the operator.

    The data plane reads `HF_TOKEN` for the model, and for an `hf://` dataset unless the
    dataset has a Secret of its own, which then arrives as `KUBETUNE_DATASET_TOKEN`.
    """
    refs = [(MODEL_TOKEN_ENV, spec.model.secret_ref or spec.dataset.secret_ref)]
    if spec.model.secret_ref and spec.dataset.secret_ref:
        refs.append((DATASET_TOKEN_ENV, spec.dataset.secret_ref))
    return [
        {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
        for name, ref in refs
        if ref is not None
    ]


def referenced_secrets(spec: FineTuneJobSpec) -> list[str]:
    """Every Secret the job's pods read. The serving API key's too, though only inference
    pods read it, and the judge's, read only after training: missing, they are reported
    before hours of training rather than after them."""
    judge = spec.evaluation.judge
    refs = (spec.model.secret_ref, spec.dataset.secret_ref, spec.serving.api_key_secret_ref,
            judge.api_key_secret_ref if judge else None)
    return sorted({ref.name for ref in refs if ref})


def trainer_cpu_and_memory(spec: FineTuneJobSpec) -> dict[str, str]:
    """`resources.cpu` and `resources.memory`, those set: what each trainer pod asks for
    besides its GPUs."""
    amounts = {"cpu": spec.resources.cpu, "memory": spec.resources.memory}
    return {name: amount for name, amount in amounts.items() if amount}


def serving_gpus(spec: FineTuneJobSpec) -> int:
    """GPUs of each pod that runs the exported model (exporter and server): none on the CPU;
    on CUDA `serving.resources.gpus`, or one when `serving.resources` is unset (the admission
    rule refuses CUDA with fewer than one GPU only when resources are given)."""
    if spec.serving.device is not Device.CUDA:
        return 0
    return spec.serving.resources.gpus if spec.serving.resources else 1


def gpu_tolerations(spec: FineTuneJobSpec, gpus: int) -> list[dict[str, Any]]:
    """The usual GPU taint (`<gpuResource>` with any value) plus the spec's own tolerations."""
    tolerations: list[dict[str, Any]] = []
    if gpus > 0:
        tolerations.append(
            {"key": spec.resources.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}
        )
    for toleration in spec.resources.tolerations or []:
        tolerations.append(toleration.to_wire())
    return tolerations


def common_env(job: str, generation: int) -> list[dict[str, Any]]:
    return [
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": f"{naming.ARTIFACTS_MOUNT}/{job}/.cache/huggingface"},
        {"name": "KUBETUNE_PVC_ROOT", "value": naming.PVC_MOUNT_ROOT},
        {"name": "KUBETUNE_GENERATION", "value": str(generation)},
    ]


def base_pod_spec(config: OperatorConfig, service_account: str) -> dict[str, Any]:
    """What every data-plane pod spec starts with. No API token is mounted: the trainer's
    progress token is a projected `serviceAccountToken` volume of its own, which works
    with automounting off. The ServiceAccount is set only when the deployment names one
    (the chart makes a token-less, permission-less one per watched namespace)."""
    spec: dict[str, Any] = {}
    if service_account:
        spec["serviceAccountName"] = service_account
    spec["automountServiceAccountToken"] = False
    spec["enableServiceLinks"] = False
    spec["securityContext"] = pod_security_context(config)
    return spec
