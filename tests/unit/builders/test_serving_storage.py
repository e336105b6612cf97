"""Where the inference pods read their model from: a copy in the pod's own emptyDir, made by an
init container that alone mounts the artifact claim (read-only, the served export only)."""

from __future__ import annotations

from typing import Any

from kubetune.api import FineTuneJobSpec
from kubetune.builders import naming
from kubetune.builders.config import OperatorConfig
from kubetune.builders.meta import Owner
from kubetune.builders.serving import MODEL_COPY_DEFAULT_SIZE, serving_deployment
from tests.unit.operator_fixtures import CONFIG, body, spec_dict


def _pod_spec(config: OperatorConfig = CONFIG, **overrides: Any) -> dict[str, Any]:
    spec = FineTuneJobSpec.model_validate(spec_dict(**overrides))
    deployment = serving_deployment(Owner.from_body(body()), 3, "0.5", spec, config)
    pod_spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return pod_spec


def _claim_volumes(pod_spec: dict[str, Any]) -> set[str]:
    return {v["name"] for v in pod_spec["volumes"] if "persistentVolumeClaim" in v}


def test_the_server_container_reads_a_copy_not_the_artifact_claim() -> None:
    pod_spec = _pod_spec()
    [server] = pod_spec["containers"]
    claims = _claim_volumes(pod_spec)
    assert claims, "the init container still needs the claim to copy from"
    assert not claims & {m["name"] for m in server["volumeMounts"]}
    model = next(m for m in server["volumeMounts"] if m["mountPath"] == naming.MODEL_MOUNT)
    [volume] = [v for v in pod_spec["volumes"] if v["name"] == model["name"]]
    assert "emptyDir" in volume and "medium" not in volume["emptyDir"]  # models are big: disk
    args = server["args"]
    assert args[args.index("--model") + 1] == naming.MODEL_MOUNT
    assert not any(naming.ARTIFACTS_MOUNT in arg for arg in args)


def test_the_init_container_copies_only_the_served_export_read_only() -> None:
    pod_spec = _pod_spec(config=OperatorConfig(serving_image="registry.example/serve:9"))
    [copy] = pod_spec["initContainers"]
    assert copy["image"] == "registry.example/serve:9"  # the server's image has the command
    assert copy["command"] == ["python"]
    assert copy["args"][:3] == ["-m", "kubetune_trainer", "copy-model"]
    [source] = [m for m in copy["volumeMounts"] if m["name"] in _claim_volumes(pod_spec)]
    assert source["readOnly"] is True
    assert source["subPath"] == "demo/gen-3/onnx"  # generation 3's export, nothing else
    args = copy["args"]
    assert args[args.index("--source") + 1] == source["mountPath"]
    [dest] = [m for m in copy["volumeMounts"] if m["mountPath"] == args[args.index("--dest") + 1]]
    [server] = pod_spec["containers"]
    assert dest["name"] in {m["name"] for m in server["volumeMounts"]}
    # Its failure reaches the pod's status as the termination message.
    assert copy["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert copy["securityContext"] == server["securityContext"]
    # CPU and memory as the server's: the pod's request stays what it was (the larger of the
    # init container's and the containers' sum), and a quota that wants limits admits it.
    for amounts in ("requests", "limits"):
        assert copy["resources"][amounts] == {
            key: value for key, value in server["resources"][amounts].items()
            if key in ("cpu", "memory")
        }  # fmt: skip


def test_the_copy_is_sized_by_the_claim_it_comes_from() -> None:
    def size_limit(pod_spec: dict[str, Any]) -> str:
        [server] = pod_spec["containers"]
        model = next(m for m in server["volumeMounts"] if m["mountPath"] == naming.MODEL_MOUNT)
        [volume] = [v for v in pod_spec["volumes"] if v["name"] == model["name"]]
        return str(volume["emptyDir"]["sizeLimit"])

    # An export is no larger than the claim that holds it.
    assert size_limit(_pod_spec(storage={"size": "20Gi"})) == "20Gi"
    assert size_limit(_pod_spec()) == CONFIG.default_storage_size
    # A claim the user brings: its size is not in the spec.
    assert size_limit(_pod_spec(storage={"claimName": "shared"})) == MODEL_COPY_DEFAULT_SIZE


def test_a_gpu_server_keeps_its_gpus_to_itself() -> None:
    pod_spec = _pod_spec(
        serving={"device": "CUDA", "precision": "FP16",
                 "resources": {"cpu": "4", "memory": "16Gi", "gpus": 1}},
    )  # fmt: skip
    [copy] = pod_spec["initContainers"]
    assert "nvidia.com/gpu" not in copy["resources"]["limits"]
    assert pod_spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
