"""The inference container's probes and termination message: a server whose model failed to
load is restarted, one still loading is not, and the pod says why it last stopped."""

from __future__ import annotations

from typing import Any

from kubetune.api import FineTuneJobSpec
from kubetune.builders.meta import Owner
from kubetune.builders.serving import serving_deployment
from tests.unit.operator_fixtures import CONFIG, body, spec_dict

LOADING_SECONDS = 300
"""Minutes a large model may take to load and warm up before anything may restart it."""


def _container() -> dict[str, Any]:
    deployment = serving_deployment(
        Owner.from_body(body()), 1, None, FineTuneJobSpec.model_validate(spec_dict()), CONFIG
    )
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def test_liveness_probes_healthz_and_tolerates_a_blip() -> None:
    probe = _container()["livenessProbe"]
    assert probe["httpGet"] == {"path": "/healthz", "port": "http"}
    # /healthz fails for a failed load or a wedged engine: restart after a few failures, not
    # after one slow answer.
    assert 2 <= probe["failureThreshold"] <= 5
    assert probe["periodSeconds"] * probe["failureThreshold"] <= 60


def test_a_loading_server_is_not_killed() -> None:
    container = _container()
    startup = container["startupProbe"]
    # Until the startup probe passes, liveness is not probed: it allows minutes of loading.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= LOADING_SECONDS
    assert startup["httpGet"]["path"] == "/healthz"  # which answers 200 while loading


def test_the_pod_says_why_the_server_last_stopped() -> None:
    # The server writes a load failure to the termination-message file; a crash that wrote
    # none (an import error, a traceback) leaves the log's tail there instead.
    assert _container()["terminationMessagePolicy"] == "FallbackToLogsOnError"
