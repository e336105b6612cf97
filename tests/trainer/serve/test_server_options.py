"""The inference Deployment the operator renders configures the server it runs.

Read from the rendered manifest (its args and env), not from the server's own flags, so a
name that differs between the builder and the server fails here.
"""

from __future__ import annotations

from kubetune.api import FineTuneJobSpec
from kubetune.builders.config import OperatorConfig
from kubetune.builders.meta import Owner
from kubetune.builders.serving import serving_deployment
from kubetune_trainer.serve.server import parse_options


def test_the_deployments_max_tokens_limit_reaches_the_server() -> None:
    spec = FineTuneJobSpec.model_validate({
        "model": {"source": "builtin://smollm2-135m-instruct"},
        "dataset": {"source": "builtin://kubectl-commands"},
        "serving": {"maxTokensLimit": 77},
    })
    owner = Owner(name="limits", namespace="team", uid="uid-1")
    deployment = serving_deployment(owner, 1, None, spec, OperatorConfig())
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    command = container["args"]
    assert command[:3] == ["-m", "kubetune_trainer", "serve"]
    env = {item["name"]: item["value"] for item in container["env"]}

    options = parse_options(command[3:], env)

    assert options.max_tokens == 77
    assert parse_options(command[3:], {}).max_tokens != 77  # the default is something else


def test_every_generation_is_served_under_the_jobs_name() -> None:
    spec = FineTuneJobSpec.model_validate({
        "model": {"source": "builtin://smollm2-135m-instruct"},
        "dataset": {"source": "builtin://kubectl-commands"},
    })
    owner = Owner(name="support-bot", namespace="team", uid="uid-1")
    names = set()
    for generation in (1, 2, 7):
        deployment = serving_deployment(owner, generation, None, spec, OperatorConfig())
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        [copy] = deployment["spec"]["template"]["spec"]["initContainers"]
        options = parse_options(container["args"][3:], {})
        # the new weights, copied where the server loads them ...
        [source] = [m for m in copy["volumeMounts"] if m.get("subPath")]
        assert source["subPath"].endswith(f"gen-{generation}/onnx")
        destination = copy["args"][copy["args"].index("--dest") + 1]
        assert str(options.model) == destination
        names.add(options.served_model_name)
    assert names == {"support-bot"}  # ... under the name clients already use


def test_a_terminating_pod_drains_within_its_grace_period() -> None:
    spec = FineTuneJobSpec.model_validate({
        "model": {"source": "builtin://smollm2-135m-instruct"},
        "dataset": {"source": "builtin://kubectl-commands"},
    })
    owner = Owner(name="drain", namespace="team", uid="uid-1")
    pod = serving_deployment(owner, 1, None, spec, OperatorConfig())["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {item["name"]: item["value"] for item in container["env"]}
    options = parse_options(container["args"][3:], env)
    # Serve through the endpoint-propagation window, then let in-flight requests finish,
    # all before the kubelet's SIGKILL.
    assert options.drain_seconds > 0
    assert options.drain_seconds + options.grace_seconds < pod["terminationGracePeriodSeconds"]


def test_the_api_key_reaches_the_server_from_its_secret_and_never_through_the_args() -> None:
    spec = FineTuneJobSpec.model_validate({
        "model": {"source": "builtin://smollm2-135m-instruct"},
        "dataset": {"source": "builtin://kubectl-commands"},
        "serving": {"apiKeySecretRef": {"name": "inference-key", "key": "api-key"}},
    })
    owner = Owner(name="secured", namespace="team", uid="uid-1")
    [container] = serving_deployment(owner, 1, None, spec, OperatorConfig())["spec"]["template"][
        "spec"
    ]["containers"]
    secrets = {("inference-key", "api-key"): "s3cret-value"}  # what the kubelet would read

    def value(item: dict) -> str:
        if "value" in item:
            return str(item["value"])
        ref = item["valueFrom"]["secretKeyRef"]
        return secrets[(ref["name"], ref["key"])]

    env = {item["name"]: value(item) for item in container["env"]}

    assert parse_options(container["args"][3:], env).api_key == "s3cret-value"
    assert "s3cret-value" not in str(container["args"])
    unsecured = serving_deployment(owner, 1, None, spec.model_copy(update={
        "serving": spec.serving.model_copy(update={"api_key_secret_ref": None})
    }), OperatorConfig())
    [plain] = unsecured["spec"]["template"]["spec"]["containers"]
    assert parse_options(plain["args"][3:], {i["name"]: i["value"] for i in plain["env"]}).api_key \
        is None


def test_the_deployments_device_reaches_the_server() -> None:
    spec = FineTuneJobSpec.model_validate({
        "model": {"source": "builtin://smollm2-135m-instruct"},
        "dataset": {"source": "builtin://kubectl-commands"},
        "serving": {"device": "CUDA", "precision": "FP16"},
    })
    owner = Owner(name="gpu", namespace="team", uid="uid-1")
    deployment = serving_deployment(owner, 1, None, spec, OperatorConfig())
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert parse_options(container["args"][3:], env).device == "CUDA"
    assert parse_options(["--model", "m"], {}).device == ""  # without it: the export's own
