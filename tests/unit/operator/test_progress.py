"""The progress endpoint's pure checks: token review, pod ownership, report shape."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kubetune.api.dataplane import ProgressReport
from kubetune.operator.progress import Refused, check_pod, check_review, progress_status

AUDIENCE = "kubetune.io/progress"


def _review(**user: object) -> dict[str, object]:
    return {
        "status": {
            "authenticated": True,
            "audiences": [AUDIENCE],
            "user": {
                "username": "system:serviceaccount:team:default",
                "extra": {
                    "authentication.kubernetes.io/pod-name": ["demo-g1-train-0-x"],
                    "authentication.kubernetes.io/pod-uid": ["uid-p"],
                },
                **user,
            },
        }
    }


def _pod(job: str = "demo", component: str = "trainer", uid: str = "uid-p") -> dict[str, object]:
    return {
        "metadata": {
            "name": "demo-g1-train-0-x",
            "namespace": "team",
            "uid": uid,
            "labels": {"kubetune.io/job": job, "app.kubernetes.io/component": component},
        }
    }


def test_a_pod_bound_token_names_its_pod() -> None:
    assert check_review(_review(), AUDIENCE) == ("team", "demo-g1-train-0-x", "uid-p")


@pytest.mark.parametrize(
    ("review", "status"),
    [
        ({"status": {"authenticated": False}}, 401),
        ({"status": {"authenticated": True, "audiences": ["https://kubernetes.default.svc"]}}, 401),
        (_review(extra={}), 403),
        (_review(username="kubernetes-admin"), 403),
    ],
)
def test_unproven_tokens_are_refused(review: dict[str, object], status: int) -> None:
    with pytest.raises(Refused) as refused:
        check_review(review, AUDIENCE)
    assert refused.value.status == status


def test_only_a_trainer_pod_of_the_same_job_may_report() -> None:
    check_pod(_pod(), "uid-p", "team", "demo")
    for pod, uid in [
        (_pod(job="other"), "uid-p"),
        (_pod(component="server"), "uid-p"),
        (_pod(uid="uid-new"), "uid-p"),
        (None, "uid-p"),
    ]:
        with pytest.raises(Refused):
            check_pod(pod, uid, "team", "demo")


def test_report_becomes_status_progress_with_decimal_strings() -> None:
    report = ProgressReport.model_validate(
        {
            "step": 50,
            "totalSteps": 200,
            "epoch": 0.25,
            "trainLoss": 1.234567891,
            "tokensPerSecond": 1530.2,
            "etaSeconds": 91.7,
            "unknown": 1,
        }
    )
    progress = progress_status(report, "2026-01-01T00:00:00Z")
    assert progress == {
        "step": 50,
        "totalSteps": 200,
        "epoch": "0.25",
        "percent": 25,
        "trainLoss": "1.23457",
        "tokensPerSecond": "1530.2",
        "etaSeconds": 91,
        "updateTime": "2026-01-01T00:00:00Z",
    }


class HeldPatches:
    """A client whose status patches wait until the test lets them through."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.release = asyncio.Event()
        self.in_flight = asyncio.Event()

    async def patch_status(self, _ns: str, _name: str, patch: dict[str, Any]) -> None:
        self.in_flight.set()
        await self.release.wait()
        self.sent.append(patch["progress"])


def test_a_report_that_arrives_while_a_patch_is_in_flight_still_lands() -> None:
    from kubetune.operator.progress import ProgressSink

    async def scenario() -> list[dict[str, Any]]:
        client = HeldPatches()
        sink = ProgressSink(client, 0.0, lambda: "now")  # type: ignore[arg-type]
        sink.submit(("ns", "job"), ProgressReport(step=1))
        await asyncio.wait_for(client.in_flight.wait(), 5)
        sink.submit(("ns", "job"), ProgressReport(step=2))  # the patch of step 1 is held
        client.release.set()
        for _ in range(100):  # until the sink has nothing left to send
            await asyncio.sleep(0.01)
            if client.sent and client.sent[-1]["step"] == 2:
                break
        return client.sent

    sent = asyncio.run(scenario())
    assert [p["step"] for p in sent] == [1, 2]


def test_non_finite_numbers_in_a_report_read_as_unknown() -> None:
    report = ProgressReport.model_validate_json(
        '{"step": 3, "trainLoss": NaN, "evalLoss": Infinity, "etaSeconds": -Infinity}'
    )
    assert report.train_loss is None and report.eval_loss is None and report.eta_seconds is None
    progress = progress_status(report, "now")
    assert progress == {"step": 3, "updateTime": "now"}
