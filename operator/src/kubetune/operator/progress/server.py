"""The operator's HTTP port: progress reports (authorized within the review budgets, then
handed to the sink), /healthz and Prometheus' /metrics."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

from aiohttp import web
from pydantic import ValidationError

from kubetune.api.dataplane import ProgressReport
from kubetune.api.ratelimit import NEVER_SECONDS, TokenBuckets
from kubetune.operator.client import ApiError, KubeClient
from kubetune.operator.metrics import CONTENT_TYPE, OperatorMetrics
from kubetune.operator.progress.binding import (
    Binding,
    Refused,
    Verdict,
    bind,
    check_current,
    check_review,
    controller_of,
)
from kubetune.operator.progress.limits import (
    VERIFIED_FOR_SECONDS,
    ExpiringCache,
    ReviewLimits,
    digest_of,
)
from kubetune.operator.progress.sink import FineTuneJobLookup, ProgressSink, api_lookup

log = logging.getLogger(__name__)
MAX_BODY = 16 * 1024
MAX_RETRY_AFTER = int(NEVER_SECONDS)
"""The longest Retry-After sent (a budget that earns nothing answers with it)."""


class ProgressServer:
    """The operator's HTTP port: progress reports, /healthz and Prometheus' /metrics.

    `reviewer` sends the TokenReviews and the reads that follow one (the token's pod, its
    Job): give it a client of its own (`KubeClient.sibling`) so that they never wait for, or
    make wait, the reconciles' connections. `client` is the default for both."""

    def __init__(
        self,
        client: KubeClient,
        audience: str,
        sink: ProgressSink,
        metrics: OperatorMetrics | None = None,
        *,
        reviewer: KubeClient | None = None,
        finetunejobs: FineTuneJobLookup | None = None,
        limits: ReviewLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.reviewer = reviewer or client
        self.audience = audience
        self.sink = sink
        self.metrics = metrics or OperatorMetrics(
            api_requests=lambda: client.requests, progress_patches=lambda: sink.patches
        )
        self.finetunejobs = finetunejobs or api_lookup(self.reviewer)
        self.limits = limits or ReviewLimits()
        lim = self.limits
        self._verified: ExpiringCache[Binding] = ExpiringCache(
            lim.remembered, VERIFIED_FOR_SECONDS, clock
        )
        self._refused: ExpiringCache[Verdict] = ExpiringCache(
            lim.remembered, lim.refused_for_seconds, clock
        )
        self._per_source = TokenBuckets(lim.source_rate, lim.source_burst, lim.remembered, clock)
        self._in_all = TokenBuckets(lim.total_rate, lim.total_burst, 1, clock)
        self._slots = asyncio.Semaphore(lim.in_flight)
        self._waiting = 0
        # One review per token and FineTuneJob at a time: requests with a token under review
        # wait for its verdict instead of sending their own.
        self._reviewing: dict[str, asyncio.Future[Binding]] = {}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/v1/progress/{namespace}/{name}", self.handle)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics_text)
        return app

    async def healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics_text(self, _: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    async def authorize(self, token: str, source: str, namespace: str, name: str) -> Binding:
        """The token's binding, or Refused. A verified token is remembered for a few minutes
        and a refused one for longer, so steady reporting and repeated bad tokens cost no
        TokenReview; a fresh token costs one, within the per-source and total budgets."""
        digest = digest_of(token)
        # A refusal is remembered for the token (the TokenReview's verdict) or for the token
        # reporting for this one FineTuneJob (the owner chain's): a pod that once posted to
        # the wrong URL is not shut out of its own job's.
        for_job = f"{digest} {namespace}/{name}"
        verdict = self._refused.get(digest) or self._refused.get(for_job)
        if verdict is not None:
            raise Refused(verdict.status, verdict.message, lasting=True, remembered=True)
        binding = self._verified.get(digest)
        if binding is None:
            pending = self._reviewing.get(for_job)
            if pending is None:
                # `bind` checked this very request's job and generation.
                return await self._review_once(for_job, digest, token, source, namespace, name)
            binding = await asyncio.shield(pending)
        if (binding.namespace, binding.name) != (namespace, name):
            raise Refused(403, f"the token's pod is not a trainer of {namespace}/{name}")
        # Remembered from an earlier request: the FineTuneJob may train another generation
        # since (kopf's index makes this read free).
        check_current(binding, await self.finetunejobs(namespace, name))
        return binding

    async def _review_once(
        self, for_job: str, digest: str, token: str, source: str, namespace: str, name: str
    ) -> Binding:
        future: asyncio.Future[Binding] = asyncio.get_running_loop().create_future()
        self._reviewing[for_job] = future
        try:
            binding = await self._verify(token, source, namespace, name)
        except Refused as refused:
            if refused.lasting:
                key = digest if refused.any_job else for_job
                self._refused.put(key, Verdict(refused.status, str(refused)))
            future.set_exception(refused)
            raise
        except BaseException as error:
            future.set_exception(Refused(503, f"cannot review the token now: {error}"))
            raise
        else:
            future.set_result(binding)
            self._verified.put(digest, binding)
            return binding
        finally:
            del self._reviewing[for_job]
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: no "never retrieved" warning when none waits

    def _admit(self, source: str) -> None:
        """Refused (429/503) when this review would exceed a budget."""
        wait = self._per_source.take(source)
        if wait > 0:
            raise Refused(429, f"too many unverified tokens from {source}", retry_after=wait)
        wait = self._in_all.take("")
        if wait > 0:
            raise Refused(429, "too many unverified tokens", retry_after=wait)
        if self._waiting >= self.limits.in_flight + self.limits.queued:
            raise Refused(503, "too many tokens under review", retry_after=1.0)

    async def _verify(self, token: str, source: str, namespace: str, name: str) -> Binding:
        self._admit(source)
        self._waiting += 1
        try:
            async with self._slots:
                self.metrics.tokenreview()
                try:
                    review = await self.reviewer.token_review(token, [self.audience])
                except ApiError as error:
                    raise Refused(503, "cannot review the token now", retry_after=1.0) from error
                claim = check_review(review, self.audience)
                if claim.namespace != namespace:
                    raise Refused(403, f"the token's pod is not in namespace {namespace}",
                                  lasting=True)  # fmt: skip
                try:
                    pod = await self.reviewer.get("v1", "Pod", namespace, claim.pod)
                    owner = controller_of(pod) if pod else None
                    job = None
                    if owner and (owner.get("apiVersion"), owner.get("kind")) == (
                        "batch/v1",
                        "Job",
                    ):
                        job = await self.reviewer.find(
                            "batch/v1", "Job", namespace, str(owner.get("name"))
                        )
                except ApiError as error:
                    raise Refused(503, "cannot read the pod now", retry_after=1.0) from error
                return bind(
                    claim, namespace, name, pod, job, await self.finetunejobs(namespace, name)
                )
        finally:
            self._waiting -= 1

    async def handle(self, request: web.Request) -> web.Response:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        header = request.headers.get("Authorization", "")
        try:
            if not self.sink.leading():
                # Before any TokenReview: a process that lost the Lease sends nothing.
                raise Refused(503, "this operator does not hold the leader Lease",
                              retry_after=5.0)  # fmt: skip
            if not header.startswith("Bearer ") or len(header) < 8:
                raise Refused(401, "missing bearer token")
            binding = await self.authorize(
                header[7:].strip(), request.remote or "", namespace, name
            )
            try:
                report = ProgressReport.model_validate(await request.json())
            except (ValueError, ValidationError) as error:
                raise Refused(400, f"not a progress report: {error}") from error
        except Refused as refused:
            if refused.status in (403, 409) and not refused.remembered:
                # Once per token: a repeated refused token must not flood the log either.
                log.warning("refused a progress report for %s/%s: %s", namespace, name, refused)
            self.metrics.report(accepted=False, code=refused.status)
            headers = {}
            if refused.retry_after > 0:
                seconds = min(MAX_RETRY_AFTER, max(1, math.ceil(refused.retry_after)))
                headers["Retry-After"] = str(seconds)
            return web.json_response(
                {"error": str(refused)}, status=refused.status, headers=headers
            )
        self.sink.submit((namespace, name), report, binding)
        self.metrics.report(accepted=True, code=202)
        return web.json_response({"accepted": True}, status=202)
