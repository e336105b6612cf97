"""The progress endpoint trainer pods report to (`KUBETUNE_REPORT_URL`).

`POST /v1/progress/<namespace>/<name>` with `Authorization: Bearer <token>`, where the token
is the pod's projected ServiceAccount token for the KubeTune audience. A report is accepted
only when

- a TokenReview asking for that audience authenticates the token, and the token is bound to a
  pod (`check_review`);
- the pod (same uid) was created by a training Job that FineTuneJob `<namespace>/<name>` (same
  uid) controls, through the ownerReferences the Job controller and the operator set, never
  through labels anyone who can create pods could copy (`bind`);
- that Job belongs to the generation the FineTuneJob trains now (its training hash is the
  spec's, or it is the generation `status.training` records): a previous generation's pod,
  still running out its grace period, is refused with 409 and its report is dropped, also
  when it was accepted earlier and waits in the sink (`check_current`).

Nothing unauthenticated reaches the API server unbounded (`ReviewLimits`): a token refused
once is remembered by its sha256 and refused again for free; TokenReviews are rationed per
source address and in all (token buckets, answered with 429 and Retry-After), and at most a
few are in flight, on a client of their own with a small connection pool and no retries, so
a flood of bad tokens never queues in front of the reconciles' requests. Status patches are
rate-limited per FineTuneJob; the newest report always lands, at most `min_interval` seconds
late.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from aiohttp import web
from pydantic import ValidationError

from kubetune.api import API_VERSION, KIND, FineTuneJobSpec
from kubetune.api.dataplane import ProgressReport
from kubetune.api.status import ProgressStatus
from kubetune.builders import naming
from kubetune.builders.meta import legacy_training_hash, training_hash
from kubetune.operator.client import ApiError, KubeClient, NotLeading
from kubetune.operator.metrics import CONTENT_TYPE, OperatorMetrics
from kubetune.reconcile.status import decimal, recorded_training

log = logging.getLogger(__name__)
POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"
VERIFIED_FOR_SECONDS = 300.0
MAX_BODY = 16 * 1024
MAX_RETRY_AFTER = 3600

FineTuneJobLookup = Callable[[str, str], Awaitable[Mapping[str, Any] | None]]
"""(namespace, name) -> the FineTuneJob's body, or None when it does not exist."""


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


PROGRESS_KEYS = tuple(field.alias or name for name, field in ProgressStatus.model_fields.items())


def progress_patch(report: ProgressReport, now: str, generation: int | None) -> dict[str, Any]:
    """The `status` merge patch of a report: the whole progress of training `generation`.
    A key the report lacks is set to null, since a merge patch would otherwise leave it from
    an earlier report, or an earlier generation. Pure."""
    progress = {**progress_status(report, now), "generation": generation}
    return {"progress": {key: progress.get(key) for key in PROGRESS_KEYS}}


class Refused(Exception):
    """A request the endpoint answers with `status`. `lasting`: the same token would be
    refused the same way later for the same FineTuneJob (the pod's owners do not change), so
    it is remembered; a refusal that may clear (a lagging read, a busy API server) is not.
    `any_job`: the TokenReview's own verdict (not authenticated, another audience, no pod),
    the same whatever FineTuneJob the token reports for. `retry_after`: the seconds a
    throttled client should wait."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        lasting: bool = False,
        retry_after: float = 0.0,
        remembered: bool = False,
        any_job: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.lasting = lasting or any_job
        self.any_job = any_job
        self.retry_after = retry_after
        self.remembered = remembered
        """Answered from memory: already logged when it was first decided."""


@dataclass(frozen=True)
class Verdict:
    """A lasting refusal, remembered by the token's digest (a fresh `Refused` is raised from
    it each time: one exception object raised again and again would grow its traceback)."""

    status: int
    message: str


@dataclass(frozen=True)
class TokenClaim:
    """Who a TokenReview says sent the token: a pod, by namespace, name and uid."""

    namespace: str
    pod: str
    pod_uid: str


@dataclass(frozen=True)
class Binding:
    """A verified token: the pod that holds it and the FineTuneJob generation it trains."""

    namespace: str
    name: str
    finetunejob_uid: str
    job: str
    job_uid: str
    generation: int
    training_hash: str
    pod_uid: str


def check_review(review: Mapping[str, Any], audience: str) -> TokenClaim:
    """The pod a TokenReview names, or Refused. Pure.

    The review was asked for `audience` only, so the API server itself refuses a token for
    another audience; the audience is checked here too, so that a review sent without
    audiences (the API server then checks against its own, and every pod's default token
    passes) can never let such a token through."""
    status = review.get("status") or {}
    if not status.get("authenticated"):
        raise Refused(401, "token not authenticated", any_job=True)
    if audience not in (status.get("audiences") or []):
        raise Refused(401, "token is not for the KubeTune progress audience", any_job=True)
    user = status.get("user") or {}
    parts = str(user.get("username", "")).split(":")
    extra = user.get("extra") or {}
    pod_name = (extra.get(POD_NAME) or [None])[0]
    pod_uid = (extra.get(POD_UID) or [None])[0]
    if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"] or not pod_name:
        raise Refused(403, "token is not bound to a pod", any_job=True)
    return TokenClaim(namespace=parts[2], pod=pod_name, pod_uid=pod_uid or "")


def controller_of(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ownerReference with `controller: true`, if any (there is at most one). Pure."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller") is True:
            return dict(ref)
    return None


def current_training_hashes(finetunejob: Mapping[str, Any]) -> frozenset[str]:
    """The training hashes a Job of the generation the FineTuneJob trains now carries: its
    spec's, and the one older operators wrote for the same spec (as `reconcile.decide`
    matches them through `reconcile.children.training_generation`). Empty when the spec does
    not parse (then it trains nothing). Pure."""
    try:
        spec = FineTuneJobSpec.model_validate(finetunejob.get("spec") or {})
    except ValidationError:
        return frozenset()
    return frozenset((training_hash(spec), legacy_training_hash(spec)))


def bind(
    claim: TokenClaim,
    namespace: str,
    name: str,
    pod: Mapping[str, Any] | None,
    job: Mapping[str, Any] | None,
    finetunejob: Mapping[str, Any] | None,
) -> Binding:
    """The verdict on a reviewed token reporting for FineTuneJob `namespace/name`: the pod
    -> training Job -> FineTuneJob chain of controller ownerReferences, uids included, and
    the Job's generation being the FineTuneJob's current one. Refused otherwise. Pure.

    Labels decide nothing here: anyone who may create pods in the namespace can copy
    `kubetune.io/job`, but only the Job controller sets a pod's controller reference to a
    Job, and a pod's ownerReferences cannot be changed to a Job created later."""
    who = f"FineTuneJob {namespace}/{name}"
    if claim.namespace != namespace:
        raise Refused(403, f"the token's pod is not in namespace {namespace}", lasting=True)
    if pod is None:
        raise Refused(403, "the token's pod no longer exists", lasting=True)
    meta = pod.get("metadata") or {}
    if (claim.pod_uid and meta.get("uid") != claim.pod_uid) or meta.get("namespace") != namespace:
        raise Refused(403, "the token's pod no longer exists", lasting=True)
    pod_owner = controller_of(pod)
    if not pod_owner or (pod_owner.get("apiVersion"), pod_owner.get("kind")) != ("batch/v1", "Job"):
        raise Refused(403, f"the token's pod was not created by a training Job of {who}",
                      lasting=True)  # fmt: skip
    if job is None:
        raise Refused(403, f"the token's pod's Job no longer exists ({who})", lasting=True)
    job_meta = job.get("metadata") or {}
    if job_meta.get("uid") != pod_owner.get("uid") or job_meta.get("name") != pod_owner.get("name"):
        raise Refused(403, f"the token's pod's Job no longer exists ({who})", lasting=True)
    job_owner = controller_of(job)
    labels = job_meta.get("labels") or {}
    generation_label = str(labels.get(naming.LABEL_GENERATION) or "")
    generation = int(generation_label) if generation_label.isdigit() else -1
    if (
        not job_owner
        or (job_owner.get("apiVersion"), job_owner.get("kind")) != (API_VERSION, KIND)
        or job_owner.get("name") != name
        or labels.get(naming.LABEL_COMPONENT) != naming.COMPONENT_TRAINER
        or job_meta.get("name") != naming.training_job_name(name, generation)
    ):
        raise Refused(403, f"the token's pod is not a trainer of {who}", lasting=True)
    if finetunejob is None:
        raise Refused(403, f"{who} does not exist")
    ftj_uid = (finetunejob.get("metadata") or {}).get("uid")
    if job_owner.get("uid") != ftj_uid:
        # A FineTuneJob deleted and created again under the same name: the old one's pods
        # are not its trainers.
        raise Refused(403, f"the token's pod is not a trainer of {who}", lasting=True)
    job_hash = str((job_meta.get("annotations") or {}).get(naming.ANNOTATION_TRAINING_HASH) or "")
    binding = Binding(
        namespace=namespace,
        name=name,
        finetunejob_uid=str(ftj_uid),
        job=str(job_meta.get("name")),
        job_uid=str(job_meta.get("uid")),
        generation=generation,
        training_hash=job_hash,
        pod_uid=str(meta.get("uid")),
    )
    check_current(binding, finetunejob)
    return binding


def check_current(binding: Binding, finetunejob: Mapping[str, Any] | None) -> None:
    """Refused (409) unless the bound pod's generation is the one the FineTuneJob trains now:
    same FineTuneJob (uid), and the spec's training hash on the pod's Job or the pod's
    generation the one `status.training` records (an invalid edit starts no generation: the
    recorded one trains on until the spec is valid). Pure."""
    who = f"FineTuneJob {binding.namespace}/{binding.name}"
    if finetunejob is None or (finetunejob.get("metadata") or {}).get("uid") != (
        binding.finetunejob_uid
    ):
        raise Refused(409, f"{who} is gone: the report of its pod is dropped")
    recorded = recorded_training(finetunejob.get("status") or {})
    still_recorded = recorded is not None and (recorded.generation, recorded.training_hash) == (
        binding.generation, binding.training_hash
    )
    if binding.training_hash not in current_training_hashes(finetunejob) and not still_recorded:
        raise Refused(
            409,
            f"the token's pod trains generation {binding.generation}, no longer the one "
            f"{who} trains: its report is dropped",
        )


# ---------------------------------------------------------------------------- bounds


@dataclass(frozen=True)
class ReviewLimits:
    """What unauthenticated requests may cost the API server (`kubetune operator` flags).

    A trainer pod needs one TokenReview per token (a verified token is reused for
    `VERIFIED_FOR_SECONDS`; tokens rotate hourly at the earliest), so these leave the
    job's own pods far below every limit."""

    source_rate: float = 0.2
    """TokenReviews per second one source address earns (one every 5 s)."""
    source_burst: int = 5
    """TokenReviews one source address may spend at once."""
    total_rate: float = 5.0
    """TokenReviews per second in all, whatever the source."""
    total_burst: int = 20
    in_flight: int = 4
    """TokenReviews sent at once (the review client's connection pool has as many)."""
    queued: int = 16
    """Requests waiting for a TokenReview slot; beyond them, 503 at once."""
    refused_for_seconds: float = 300.0
    """How long a refused token is refused again without a TokenReview."""
    remembered: int = 10000
    """Tokens (verified, refused) and sources remembered; the oldest are forgotten first."""


V = TypeVar("V")


class ExpiringCache(Generic[V]):
    """A bounded map with a time to live: the least recently stored entry goes first."""

    def __init__(self, size: int, ttl: float, clock: Callable[[], float]) -> None:
        self.size, self.ttl, self.clock = size, ttl, clock
        self._items: OrderedDict[str, tuple[float, V]] = OrderedDict()

    def get(self, key: str) -> V | None:
        found = self._items.get(key)
        if found is None:
            return None
        if found[0] <= self.clock():
            del self._items[key]
            return None
        return found[1]

    def put(self, key: str, value: V) -> None:
        self._items.pop(key, None)
        self._items[key] = (self.clock() + self.ttl, value)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class TokenBuckets:
    """One token bucket per key (a source address), in a bounded map: a key forgotten for
    room starts again full, which only gives back what it had earned anyway."""

    def __init__(self, rate: float, burst: int, size: int, clock: Callable[[], float]) -> None:
        self.rate, self.burst, self.size, self.clock = rate, float(burst), size, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float:
        """0.0 when a token was taken; else the seconds until one is earned."""
        now = self.clock()
        tokens, then = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate if self.rate > 0 else float(MAX_RETRY_AFTER)
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.size:
            self._buckets.popitem(last=False)
        return wait


def digest_of(token: str) -> str:
    """Caches key tokens by their sha256: the operator keeps no usable credential."""
    return hashlib.sha256(token.encode()).hexdigest()


# ---------------------------------------------------------------------------- the sink


class ProgressSink:
    """Rate-limited status patches: at most one per FineTuneJob every `min_interval` s.

    With `finetunejobs`, a report's binding is checked again just before its patch: a report
    accepted from a generation that has been replaced since is dropped, not written over the
    new generation's progress."""

    def __init__(
        self,
        client: KubeClient,
        min_interval: float,
        clock: Callable[[], str],
        on_patched: Callable[[tuple[str, str], Any], None] | None = None,
        finetunejobs: FineTuneJobLookup | None = None,
        leading: Callable[[], bool] | None = None,
    ) -> None:
        self.client = client
        self.leading = leading or (lambda: True)
        """The operator's write gate: no report is taken, held or patched while it is shut
        (another operator holds the Lease)."""
        self.min_interval = min_interval
        self.clock = clock
        self.on_patched = on_patched
        self.finetunejobs = finetunejobs
        self._last: dict[tuple[str, str], float] = {}
        self._pending: dict[tuple[str, str], tuple[ProgressReport, Binding | None]] = {}
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.patches = 0
        self.dropped = 0

    def submit(
        self, key: tuple[str, str], report: ProgressReport, binding: Binding | None = None
    ) -> None:
        if not self.leading():
            return
        self._pending[key] = (report, binding)
        if key not in self._tasks:
            wait = max(0.0, self._last.get(key, 0.0) + self.min_interval - time.monotonic())
            self._tasks[key] = asyncio.create_task(self._flush(key, wait))

    async def _flush(self, key: tuple[str, str], wait: float) -> None:
        try:
            await asyncio.sleep(wait)  # the rate limit itself, not a wait for a condition
            report, binding = self._pending.pop(key)
            if not self.leading():
                return
            if binding is not None and self.finetunejobs is not None:
                try:
                    check_current(binding, await self.finetunejobs(*key))
                except Refused as refused:
                    self.dropped += 1
                    log.info("progress of %s/%s dropped: %s", *key, refused)
                    return
            self._last[key] = time.monotonic()
            generation = binding.generation if binding is not None else None
            result = await self.client.patch_status(
                key[0], key[1], progress_patch(report, self.clock(), generation)
            )
            self.patches += 1
            if self.on_patched is not None and result is not None:
                self.on_patched(key, result)
        except ApiError as error:
            log.warning("progress of %s/%s not saved: %s", *key, error)
        except NotLeading:
            log.info("progress of %s/%s dropped: the Lease is lost", *key)
        except Exception:  # a task's exception is otherwise lost unseen
            log.exception("progress of %s/%s not saved", *key)
        finally:
            self._tasks.pop(key, None)
            if key in self._pending and self.leading():
                # A report arrived while this patch was in flight: send it too, after the
                # interval (the newest report always lands, not only the one before it).
                self._tasks[key] = asyncio.create_task(self._flush(key, self.min_interval))

    def close(self) -> None:
        """The Lease is lost: cancel every pending patch, keep nothing to send."""
        for key in list(self._tasks):
            self.forget(key)
        self._pending.clear()

    def forget(self, key: tuple[str, str]) -> None:
        task = self._tasks.pop(key, None)
        if task is not None:
            task.cancel()
        self._pending.pop(key, None)
        self._last.pop(key, None)


def api_lookup(client: KubeClient) -> FineTuneJobLookup:
    """FineTuneJobs read from the API server, one request each (a list by name: the
    operator may list and watch FineTuneJobs, not get them)."""

    async def lookup(namespace: str, name: str) -> Mapping[str, Any] | None:
        found: Mapping[str, Any] | None = await client.find(API_VERSION, KIND, namespace, name)
        return found

    return lookup


def index_lookup(shared: Mapping[str, Any], fallback: FineTuneJobLookup) -> FineTuneJobLookup:
    """FineTuneJobs from kopf's `finetunejobs` index (kept in `memo.shared` by the handlers),
    read for free on every report; `fallback` (a GET) before the index exists or when it
    does not hold the job yet (a watch event still on its way)."""

    async def lookup(namespace: str, name: str) -> Mapping[str, Any] | None:
        indexes = shared.get("indexes")
        if indexes is not None:
            bodies = list(indexes["finetunejobs"].get((namespace, name)) or ())
            if bodies:
                found: Mapping[str, Any] = bodies[0]
                return found
        return await fallback(namespace, name)

    return lookup


# ---------------------------------------------------------------------------- the server


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
