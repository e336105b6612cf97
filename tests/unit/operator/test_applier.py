"""The applier's bookkeeping around the drift decision (issue 13, finding 6): what it sends
while the watch lags, after a deletion, after an edit by someone else, and when the server
stores a value differently from how KubeTune writes it.

The client is a unit fake (it records applies and answers with a resource version); the same
paths run against the real API server in tests/e2e/test_convergence.py.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from kubetune.builders import naming
from kubetune.builders.meta import Owner
from kubetune.builders.serving import serving_service
from kubetune.operator.applier import Applier
from kubetune.operator.client import ApiError
from kubetune.operator.lanes import Lanes
from kubetune.reconcile.refusals import Refusal
from tests.unit.operator_fixtures import body

KEY = ("team", "demo")


class RecordingClient:
    def __init__(self) -> None:
        self.applied: list[str] = []
        self.version = 100

    async def apply(self, manifest: dict[str, Any], metadata_only: bool = False) -> Any:
        self.version += 1
        self.applied.append(manifest["metadata"]["name"])
        return {"metadata": {"resourceVersion": str(self.version)}}


def _observed(manifest: dict[str, Any], version: int) -> dict[str, Any]:
    stored = copy.deepcopy(manifest)
    stored["metadata"]["resourceVersion"] = str(version)
    return stored


def _run(applier: Applier, manifest: dict[str, Any], children: list[dict[str, Any]]) -> None:
    asyncio.run(applier.apply(KEY, [manifest], children))


def test_deleted_edited_and_lagging_children() -> None:
    client = RecordingClient()
    applier = Applier(client, Lanes())  # type: ignore[arg-type]
    service = serving_service(Owner.from_body(body()))

    _run(applier, service, [])  # missing: created
    assert client.applied == ["demo-server"]
    _run(applier, service, [])  # the watch has not delivered it yet: not sent twice
    assert client.applied == ["demo-server"]

    _run(applier, service, [_observed(service, 101)])  # the index shows our apply
    assert client.applied == ["demo-server"]
    _run(applier, service, [])  # then it is gone: someone deleted it
    assert client.applied == ["demo-server"] * 2

    edited = _observed(service, 150)
    edited["spec"]["selector"] = {"app": "else"}
    _run(applier, service, [edited])  # edited by someone else: reverted
    assert client.applied == ["demo-server"] * 3

    # The server answered 103 and the index still reads as drifted at 103: a value the
    # server stores its own way. Sending it again would change nothing.
    normalised = _observed(service, 103)
    normalised["spec"]["ports"][0]["targetPort"] = 8000
    _run(applier, service, [normalised])
    assert client.applied == ["demo-server"] * 3


class RefusingClient(RecordingClient):
    """Answers every apply as the API server answers an invalid object."""

    async def apply(self, manifest: dict[str, Any], metadata_only: bool = False) -> Any:
        self.applied.append(manifest["metadata"]["name"])
        raise ApiError(
            422, "PATCH", "/api/v1/namespaces/team/services/demo-server",
            {"kind": "Status", "message": 'Service "demo-server" is invalid: spec.ports: Required'},
        )


def test_a_refused_child_is_remembered_with_the_servers_message_and_not_resent() -> None:
    client = RefusingClient()
    applier = Applier(client, Lanes())  # type: ignore[arg-type]
    service = serving_service(Owner.from_body(body()))
    _run(applier, service, [])
    _run(applier, service, [])
    assert client.applied == ["demo-server"]
    assert applier.refusals(KEY) == [
        Refusal(
            kind="Service",
            name="demo-server",
            digest=service["metadata"]["annotations"][naming.ANNOTATION_HASH],
            message='Service "demo-server" is invalid: spec.ports: Required',
        )
    ]
    changed = copy.deepcopy(service)
    changed["metadata"]["annotations"][naming.ANNOTATION_HASH] = "another"
    _run(applier, changed, [])  # an edited spec renders another manifest: sent again
    assert client.applied == ["demo-server"] * 2
    applier.forget(KEY)
    assert applier.refusals(KEY) == []
