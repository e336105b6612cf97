"""The progress endpoint trainer pods report to (`KUBETUNE_REPORT_URL`).

`POST /v1/progress/<namespace>/<name>` with `Authorization: Bearer <token>`, where the token
is the pod's projected ServiceAccount token for the KubeTune audience. A report is accepted
only when a TokenReview (with that audience) authenticates the token, the token is bound to a
pod, and that pod (same uid) carries `kubetune.io/job=<name>` in `<namespace>`: a pod can
report for its own FineTuneJob only. Status patches are rate-limited per FineTuneJob; the
newest report always lands, at most `min_interval` seconds late.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from kubetune.api.dataplane import ProgressReport
from kubetune.builders import naming
from kubetune.operator.client import ApiError, KubeClient
from kubetune.operator.metrics import CONTENT_TYPE, OperatorMetrics
from kubetune.reconcile.status import decimal

log = logging.getLogger(__name__)
POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"
VERIFIED_FOR_SECONDS = 300.0
MAX_BODY = 16 * 1024


def progress_status(report: ProgressReport, now: str) -> dict[str, Any]:
    """`status.progress` from a trainer's report: decimals as strings, a percentage."""
    percent = None
    if report.total_steps:
        percent = max(0, min(100, report.step * 100 // report.total_steps))
    progress = {
        "step": report.step,
        "totalSteps": report.total_steps,
        "epoch": decimal(report.epoch),
        "percent": percent,
        "trainLoss": decimal(report.train_loss),
        "evalLoss": decimal(report.eval_loss),
        "tokensPerSecond": decimal(report.tokens_per_second),
        "etaSeconds": None if report.eta_seconds is None else int(report.eta_seconds),
        "updateTime": now,
    }
    return {k: v for k, v in progress.items() if v is not None}


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def check_review(review: Mapping[str, Any], audience: str) -> tuple[str, str, str]:
    """(namespace, pod name, pod uid) from a TokenReview, or Refused. Pure."""
    status = review.get("status") or {}
    if not status.get("authenticated"):
        raise Refused(401, "token not authenticated")
    if audience not in (status.get("audiences") or []):
        raise Refused(401, "token is not for the KubeTune progress audience")
    user = status.get("user") or {}
    parts = str(user.get("username", "")).split(":")
    extra = user.get("extra") or {}
    pod_name = (extra.get(POD_NAME) or [None])[0]
    pod_uid = (extra.get(POD_UID) or [None])[0]
    if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"] or not pod_name:
        raise Refused(403, "token is not bound to a pod")
    return parts[2], pod_name, pod_uid or ""


def check_pod(pod: Mapping[str, Any] | None, uid: str, namespace: str, job: str) -> None:
    """The token's pod must still exist (same uid) and belong to FineTuneJob `job`. Pure."""
    if pod is None:
        raise Refused(403, "the token's pod no longer exists")
    meta = pod.get("metadata") or {}
    if uid and meta.get("uid") != uid:
        raise Refused(403, "the token's pod no longer exists")
    labels = meta.get("labels") or {}
    if (
        meta.get("namespace") != namespace
        or labels.get(naming.LABEL_JOB) != job
        or labels.get(naming.LABEL_COMPONENT) != naming.COMPONENT_TRAINER
    ):
        raise Refused(403, f"the token's pod is not a trainer of FineTuneJob {namespace}/{job}")


class ProgressSink:
    """Rate-limited status patches: at most one per FineTuneJob every `min_interval` s."""

    def __init__(
        self,
        client: KubeClient,
        min_interval: float,
        clock: Callable[[], str],
        on_patched: Callable[[tuple[str, str], Any], None] | None = None,
    ) -> None:
        self.client = client
        self.min_interval = min_interval
        self.clock = clock
        self.on_patched = on_patched
        self._last: dict[tuple[str, str], float] = {}
        self._pending: dict[tuple[str, str], ProgressReport] = {}
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.patches = 0

    def submit(self, key: tuple[str, str], report: ProgressReport) -> None:
        self._pending[key] = report
        if key not in self._tasks:
            wait = max(0.0, self._last.get(key, 0.0) + self.min_interval - time.monotonic())
            self._tasks[key] = asyncio.create_task(self._flush(key, wait))

    async def _flush(self, key: tuple[str, str], wait: float) -> None:
        try:
            await asyncio.sleep(wait)  # the rate limit itself, not a wait for a condition
            report = self._pending.pop(key)
            self._last[key] = time.monotonic()
            result = await self.client.patch_status(
                key[0], key[1], {"progress": progress_status(report, self.clock())}
            )
            self.patches += 1
            if self.on_patched is not None and result is not None:
                self.on_patched(key, result)
        except ApiError as error:
            log.warning("progress of %s/%s not saved: %s", *key, error)
        except Exception:  # a task's exception is otherwise lost unseen
            log.exception("progress of %s/%s not saved", *key)
        finally:
            self._tasks.pop(key, None)
            if key in self._pending:
                # A report arrived while this patch was in flight: send it too, after the
                # interval (the newest report always lands, not only the one before it).
                self._tasks[key] = asyncio.create_task(self._flush(key, self.min_interval))

    def forget(self, key: tuple[str, str]) -> None:
        task = self._tasks.pop(key, None)
        if task is not None:
            task.cancel()
        self._pending.pop(key, None)
        self._last.pop(key, None)


class ProgressServer:
    """The operator's HTTP port: progress reports, /healthz and Prometheus' /metrics."""

    def __init__(
        self,
        client: KubeClient,
        audience: str,
        sink: ProgressSink,
        metrics: OperatorMetrics | None = None,
    ) -> None:
        self.client = client
        self.audience = audience
        self.sink = sink
        self.metrics = metrics or OperatorMetrics(
            api_requests=lambda: client.requests, progress_patches=lambda: sink.patches
        )
        self._verified: dict[str, tuple[float, str, str]] = {}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/v1/progress/{namespace}/{name}", self.handle)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics_text)
        return app

    async def healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics_text(self, _: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE}
        )

    async def _authorize(self, token: str, namespace: str, name: str) -> None:
        """Refused unless the token proves a trainer pod of `namespace/name` sent it. A
        verified token is remembered for a few minutes, so steady reporting costs no
        TokenReview per report."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        cached = self._verified.get(digest)
        if cached and cached[0] > time.monotonic():
            if (cached[1], cached[2]) != (namespace, name):
                raise Refused(403, f"the token's pod is not a trainer of {namespace}/{name}")
            return
        try:
            review = await self.client.token_review(token, [self.audience])
        except ApiError as error:
            raise Refused(503, "cannot review the token now") from error
        token_namespace, pod_name, uid = check_review(review, self.audience)
        if token_namespace != namespace:
            raise Refused(403, f"the token's pod is not in namespace {namespace}")
        try:
            pod = await self.client.get("v1", "Pod", namespace, pod_name)
        except ApiError as error:
            raise Refused(503, "cannot read the pod now") from error
        check_pod(pod, uid, namespace, name)
        if len(self._verified) > 10000:
            self._verified.clear()
        self._verified[digest] = (time.monotonic() + VERIFIED_FOR_SECONDS, namespace, name)

    async def handle(self, request: web.Request) -> web.Response:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        header = request.headers.get("Authorization", "")
        try:
            if not header.startswith("Bearer ") or len(header) < 8:
                raise Refused(401, "missing bearer token")
            await self._authorize(header[7:].strip(), namespace, name)
            try:
                report = ProgressReport.model_validate(await request.json())
            except (ValueError, ValidationError) as error:
                raise Refused(400, f"not a progress report: {error}") from error
        except Refused as refused:
            if refused.status == 403:
                log.warning("refused a progress report for %s/%s: %s", namespace, name, refused)
            self.metrics.report(accepted=False, code=refused.status)
            return web.json_response({"error": str(refused)}, status=refused.status)
        self.sink.submit((namespace, name), report)
        self.metrics.report(accepted=True, code=202)
        return web.json_response({"accepted": True}, status=202)
