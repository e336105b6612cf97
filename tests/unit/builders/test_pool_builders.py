"""The shared pool's objects (`kubetune.builders.pool`): what its server runs with, what it
mounts, who owns it, and the member's publish Job."""

from __future__ import annotations

from typing import Any

from kubetune.api import FineTuneJobSpec
from kubetune.api.dataplane import CONFIG_ERROR_EXIT_CODE, AdapterSet, ServedAdapter
from kubetune.builders.meta import Owner
from kubetune.builders.pool import PoolOwners, base_export_args, pool_objects, publish_job
from tests.unit.operator_fixtures import CONFIG, spec_dict

OWNERS = PoolOwners("team", "ns", (Owner("b", "ns", "uid-b"), Owner("a", "ns", "uid-a")))


def _spec(**serving: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(spec_dict(serving={"share": "team", **serving}))


def _objects(adapters: AdapterSet, **serving: Any) -> dict[str, dict[str, Any]]:
    built = pool_objects(OWNERS, _spec(**serving), adapters, CONFIG, base_exported=True)
    return {m["kind"]: m for m in built}


def test_the_pool_server_loads_its_set_at_start_and_takes_loads_at_run_time() -> None:
    deployment = _objects(AdapterSet())["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--lora-modules-file") + 1] == "/etc/kubetune/pool/adapters.json"
    assert "--enable-runtime-lora" in args and args[args.index("--engine") + 1] == "batch"
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/adapters"] == {"name": "pool", "mountPath": "/adapters",
                                   "subPath": "adapters", "readOnly": True}
    copy = pod["initContainers"][0]["volumeMounts"][0]
    assert (copy["subPath"], copy["readOnly"]) == ("base/onnx", True)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["pool"]["persistentVolumeClaim"] == {"claimName": "team-pool-store",
                                                        "readOnly": True}
    assert volumes["pool-config"]["configMap"] == {"name": "team-pool-adapters"}


def test_a_changed_adapter_set_changes_the_config_map_and_never_rolls_the_pods() -> None:
    before = _objects(AdapterSet())
    after = _objects(AdapterSet(adapters=[ServedAdapter(name="a", path="/adapters/a/gen-1")]))
    assert before["Deployment"] == after["Deployment"]
    assert before["ConfigMap"]["data"] != after["ConfigMap"]["data"]


def test_every_member_owns_the_pool_and_none_controls_it() -> None:
    for manifest in _objects(AdapterSet()).values():
        refs = manifest["metadata"]["ownerReferences"]
        assert [(r["name"], r["uid"], r["controller"]) for r in refs] == [
            ("a", "uid-a", False), ("b", "uid-b", False)]
        assert manifest["metadata"]["labels"]["kubetune.io/pool"] == "team"
        assert "kubetune.io/job" not in manifest["metadata"]["labels"]


def test_no_deployment_before_the_base_is_exported() -> None:
    built = pool_objects(OWNERS, _spec(), AdapterSet(), CONFIG, base_exported=False)
    assert [m["kind"] for m in built] == ["PersistentVolumeClaim", "Job", "ConfigMap"]
    assert built[0]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_the_base_export_resolves_auto_to_its_device_default() -> None:
    args = base_export_args(_spec())
    assert args[args.index("--input") + 1] == "builtin://smollm2-135m-instruct"
    assert args[args.index("--precision") + 1] == "INT4"
    assert args[args.index("--output") + 1] == "/mnt/pool/base/onnx"


def test_publish_copies_the_generations_adapter_onto_the_pool_claim() -> None:
    job = publish_job(Owner("a", "ns", "uid-a"), 3, _spec(), CONFIG)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][-5:] == ["--adapter", "--source", "/mnt/adapter", "--dest",
                                      "/mnt/pool/adapters/a/gen-3"]
    source = container["volumeMounts"][0]
    assert (source["subPath"], source["readOnly"]) == ("a/gen-3/adapter", True)
    assert job["metadata"]["ownerReferences"][0]["name"] == "a"
    assert job["metadata"]["labels"]["kubetune.io/job"] == "a"


def test_the_base_export_fails_at_once_on_a_configuration_error_as_a_jobs_export_does() -> None:
    # A base that cannot be exported (say, a model the exporter refuses) exits with the
    # configuration-error code: retrying it would fail the same way, backoffLimit times.
    job = pool_objects(OWNERS, _spec(), AdapterSet(), CONFIG, base_exported=False)[1]
    [fail_job, _] = job["spec"]["podFailurePolicy"]["rules"]
    assert fail_job["action"] == "FailJob"
    assert fail_job["onExitCodes"]["values"] == [CONFIG_ERROR_EXIT_CODE]
