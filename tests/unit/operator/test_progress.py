"""The progress endpoint: token review, the owner chain and generation binding, the budgets
that keep bad tokens from costing the API server, and the sink's patches.

`FakeCluster` stands in for the API server at the endpoint's seam (`token_review`, `get`,
`patch_status`) and counts what reaches it; it answers TokenReviews the way kube-apiserver
does (authenticated only for an audience the review asks for, or the API server's own when
it asks for none). `tests/e2e/test_progress_auth.py` runs the same paths against a real
kube-apiserver.
"""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kubetune.api import FineTuneJobSpec
from kubetune.api.dataplane import ProgressReport
from kubetune.api.ratelimit import TokenBuckets
from kubetune.builders import naming
from kubetune.builders.meta import Owner, legacy_training_hash, training_hash
from kubetune.builders.training import training_job
from kubetune.operator.main import add_operator_command, review_limits_from_args
from kubetune.operator.metrics import OperatorMetrics
from kubetune.operator.progress.binding import (
    Binding,
    Refused,
    TokenClaim,
    bind,
    check_current,
    check_review,
)
from kubetune.operator.progress.limits import ReviewLimits
from kubetune.operator.progress.server import ProgressServer
from kubetune.operator.progress.sink import ProgressSink
from kubetune.operator.progress.status import progress_status
from tests.unit.operator_fixtures import CONFIG, spec_dict

AUDIENCE = "kubetune.io/progress"
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
SPEC = spec_dict(training={"maxSteps": 100})


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


def test_a_pod_bound_token_names_its_pod() -> None:
    assert check_review(_review(), AUDIENCE) == TokenClaim("team", "demo-g1-train-0-x", "uid-p")


@pytest.mark.parametrize(
    ("review", "status"),
    [
        ({"status": {"authenticated": False}}, 401),
        # What the API server answers for a review sent without audiences: authenticated,
        # for its own audience. KubeTune's own check is all that stands in the way then.
        ({"status": {"authenticated": True, "audiences": [API_AUDIENCE]}}, 401),
        (_review(extra={}), 403),
        (_review(username="kubernetes-admin"), 403),
    ],
)
def test_unproven_tokens_are_refused(review: dict[str, object], status: int) -> None:
    with pytest.raises(Refused) as refused:
        check_review(review, AUDIENCE)
    assert refused.value.status == status


# ---------------------------------------------------------------------------- the owner chain


def _finetunejob(
    name: str = "demo", uid: str = "uid-f", spec: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "team", "uid": uid, "generation": 1},
        "spec": spec or SPEC,
    }


def _training_job(finetunejob: dict[str, Any], generation: int = 1) -> dict[str, Any]:
    """The training Job the operator builds (the real builder), as the API server stores
    it: with a uid."""
    spec = FineTuneJobSpec.model_validate(finetunejob["spec"])
    owner = Owner.from_body(finetunejob)
    job = training_job(owner, generation, spec, CONFIG, training_hash(spec))
    job["metadata"]["uid"] = f"uid-job-{owner.name}-{generation}"
    return job


def _pod_of(job: dict[str, Any], index: int = 0) -> dict[str, Any]:
    """A pod as the Job controller creates it: the template's labels, a controller
    reference to the Job."""
    name = f"{job['metadata']['name']}-{index}-abcde"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": job["metadata"]["namespace"],
            "uid": f"uid-pod-{name}",
            "labels": dict(job["spec"]["template"]["metadata"]["labels"]),
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": job["metadata"]["name"],
                    "uid": job["metadata"]["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
    }


def _claim(pod: dict[str, Any]) -> TokenClaim:
    meta = pod["metadata"]
    return TokenClaim(meta["namespace"], meta["name"], meta["uid"])


def _forged(labels_from: dict[str, Any]) -> dict[str, Any]:
    """A bare pod whoever may create pods in the namespace can make: every label of a real
    trainer pod, no owner."""
    pod = _pod_of(labels_from)
    pod["metadata"]["name"] = "forged"
    pod["metadata"]["uid"] = "uid-forged"
    del pod["metadata"]["ownerReferences"]
    return pod


def test_a_trainer_pod_of_the_current_generation_is_bound_to_its_finetunejob() -> None:
    ftj = _finetunejob()
    job = _training_job(ftj, generation=2)
    pod = _pod_of(job)

    binding = bind(_claim(pod), "team", "demo", pod, job, ftj)

    assert binding == Binding(
        namespace="team",
        name="demo",
        finetunejob_uid="uid-f",
        job="demo-g2-train",
        job_uid="uid-job-demo-2",
        generation=2,
        training_hash=training_hash(FineTuneJobSpec.model_validate(SPEC)),
        pod_uid=pod["metadata"]["uid"],
    )


def _refusal(
    claim: TokenClaim,
    pod: dict[str, Any] | None,
    job: dict[str, Any] | None,
    ftj: dict[str, Any] | None,
    name: str = "demo",
) -> int:
    with pytest.raises(Refused) as refused:
        bind(claim, "team", name, pod, job, ftj)
    return refused.value.status


def test_a_pod_with_a_trainers_labels_but_no_owner_is_refused() -> None:
    ftj = _finetunejob()
    job = _training_job(ftj)
    forged = _forged(job)
    assert forged["metadata"]["labels"][naming.LABEL_JOB] == "demo"
    assert _refusal(_claim(forged), forged, None, ftj) == 403
    # Not even when it names the real Job as its owner but with another uid.
    forged["metadata"]["ownerReferences"] = [
        {"apiVersion": "batch/v1", "kind": "Job", "name": job["metadata"]["name"],
         "uid": "uid-made-up", "controller": True}
    ]  # fmt: skip
    assert _refusal(_claim(forged), forged, job, ftj) == 403


def test_a_trainer_of_another_finetunejob_is_refused() -> None:
    mine, theirs = _finetunejob("mine", "uid-mine"), _finetunejob("theirs", "uid-theirs")
    job = _training_job(mine)
    pod = _pod_of(job)
    assert _refusal(_claim(pod), pod, job, theirs, name="theirs") == 403


def test_a_trainer_of_a_deleted_finetunejob_of_the_same_name_is_refused() -> None:
    old = _finetunejob(uid="uid-old")
    job = _training_job(old)
    pod = _pod_of(job)
    assert _refusal(_claim(pod), pod, job, _finetunejob(uid="uid-new")) == 403
    assert _refusal(_claim(pod), pod, job, None) == 403


def test_an_export_pod_is_not_a_trainer() -> None:
    ftj = _finetunejob()
    job = _training_job(ftj)
    job["metadata"]["name"] = naming.export_job_name("demo", 1)
    job["metadata"]["labels"][naming.LABEL_COMPONENT] = naming.COMPONENT_EXPORTER
    pod = _pod_of(job)
    assert _refusal(_claim(pod), pod, job, ftj) == 403


def test_a_replaced_pod_or_a_pod_elsewhere_is_refused() -> None:
    ftj = _finetunejob()
    job = _training_job(ftj)
    pod = _pod_of(job)
    replaced = TokenClaim("team", pod["metadata"]["name"], "uid-of-an-earlier-pod")
    assert _refusal(replaced, pod, job, ftj) == 403
    assert _refusal(_claim(pod), None, job, ftj) == 403
    elsewhere = TokenClaim("other", pod["metadata"]["name"], pod["metadata"]["uid"])
    assert _refusal(elsewhere, pod, job, ftj) == 403


def test_a_previous_generations_pod_gets_409() -> None:
    ftj = _finetunejob()
    old_job = _training_job(ftj, generation=1)
    pod = _pod_of(old_job)
    # The spec changed the model: the FineTuneJob trains generation 2 now.
    newer = _finetunejob(spec={**SPEC, "training": {"maxSteps": 200}})
    assert _refusal(_claim(pod), pod, old_job, newer) == 409


def test_a_change_that_trains_no_new_generation_keeps_the_binding() -> None:
    ftj = _finetunejob()
    job = _training_job(ftj)
    pod = _pod_of(job)
    binding = bind(_claim(pod), "team", "demo", pod, job, ftj)
    check_current(binding, _finetunejob(spec={**SPEC, "suspend": False}))
    with pytest.raises(Refused) as refused:
        check_current(binding, _finetunejob(spec={**SPEC, "method": "Full"}))
    assert refused.value.status == 409


def test_the_recorded_generation_stays_current_while_an_invalid_edit_waits() -> None:
    """An invalid edit (here: a dataset on a claim that does not exist) starts no generation:
    the recorded one (`status.training`) trains on, and its reports are taken."""
    ftj = _finetunejob()
    job = _training_job(ftj)
    pod = _pod_of(job)
    binding = bind(_claim(pod), "team", "demo", pod, job, ftj)
    invalid_edit = _finetunejob(spec={**SPEC, "dataset": {"source": "pvc://missing/t.jsonl"}})
    recorded = {"generation": 1, "trainingHash": binding.training_hash}
    check_current(binding, {**invalid_edit, "status": {"training": recorded}})
    # Another generation's record does not vouch for this pod.
    other = {"generation": 2, "trainingHash": binding.training_hash}
    with pytest.raises(Refused) as refused:
        check_current(binding, {**invalid_edit, "status": {"training": other}})
    assert refused.value.status == 409


def test_a_job_an_older_operator_hashed_is_still_current() -> None:
    ftj = _finetunejob()
    job = _training_job(ftj)
    legacy = legacy_training_hash(FineTuneJobSpec.model_validate(SPEC))
    job["metadata"]["annotations"][naming.ANNOTATION_TRAINING_HASH] = legacy
    pod = _pod_of(job)
    assert bind(_claim(pod), "team", "demo", pod, job, ftj).training_hash == legacy


# ---------------------------------------------------------------------------- the seam


@dataclass
class Token:
    """A ServiceAccount token as the API server issued it."""

    audiences: tuple[str, ...]
    pod: dict[str, Any] | None = None


@dataclass
class FakeCluster:
    """The API server at the progress endpoint's seam, counting what reaches it."""

    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    tokens: dict[str, Token] = field(default_factory=dict)
    reviews: list[list[str]] = field(default_factory=list)
    patches: list[dict[str, Any]] = field(default_factory=list)
    requests: Counter[str] = field(default_factory=Counter)
    hold_reviews: asyncio.Event | None = None
    review_latency: float = 0.0
    in_flight: int = 0
    most_in_flight: int = 0

    def add(self, *objs: dict[str, Any]) -> None:
        for obj in objs:
            meta = obj["metadata"]
            self.objects[(obj["kind"], meta["namespace"], meta["name"])] = obj

    def token_for(self, pod: dict[str, Any] | None, audience: str = AUDIENCE) -> str:
        token = f"token-{len(self.tokens)}"
        self.tokens[token] = Token((audience,), pod)
        return token

    async def token_review(self, token: str, audiences: list[str]) -> dict[str, Any]:
        self.requests["POST tokenreviews"] += 1
        self.reviews.append(list(audiences))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.hold_reviews is not None:
                await self.hold_reviews.wait()
            await asyncio.sleep(self.review_latency)  # an answer takes a while to come back
        finally:
            self.in_flight -= 1
        issued = self.tokens.get(token)
        # kube-apiserver: the token must be valid for one of the audiences asked for (its
        # own --api-audiences when none are); the answer lists those it is valid for.
        matched = [a for a in (audiences or [API_AUDIENCE]) if issued and a in issued.audiences]
        if issued is None or not matched:
            return {"status": {"authenticated": False, "error": "invalid bearer token"}}
        user: dict[str, Any] = {"username": "system:serviceaccount:team:default"}
        if issued.pod is not None:
            meta = issued.pod["metadata"]
            user["extra"] = {
                "authentication.kubernetes.io/pod-name": [meta["name"]],
                "authentication.kubernetes.io/pod-uid": [meta["uid"]],
            }
        return {"status": {"authenticated": True, "audiences": matched, "user": user}}

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> Any:
        self.requests[f"GET {kind}"] += 1
        return self.objects.get((kind, namespace, name))

    async def find(self, api_version: str, kind: str, namespace: str, name: str) -> Any:
        self.requests[f"LIST {kind}"] += 1
        return self.objects.get((kind, namespace, name))

    async def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> Any:
        self.patches.append({"name": name, **patch["progress"]})
        return None


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Endpoint:
    cluster: FakeCluster
    server: ProgressServer
    sink: ProgressSink
    clock: FakeClock
    metrics: OperatorMetrics


def _endpoint(limits: ReviewLimits | None = None, min_interval: float = 0.0) -> Endpoint:
    cluster = FakeCluster()
    ftj = _finetunejob()
    job = _training_job(ftj)
    cluster.add(ftj, job, _pod_of(job))

    async def finetunejobs(namespace: str, name: str) -> dict[str, Any] | None:
        return cluster.objects.get(("FineTuneJob", namespace, name))

    clock = FakeClock()
    sink = ProgressSink(
        cluster,  # type: ignore[arg-type]
        min_interval,
        lambda: "now",
        finetunejobs=finetunejobs,
    )
    metrics = OperatorMetrics()
    server = ProgressServer(
        cluster,  # type: ignore[arg-type]
        AUDIENCE,
        sink,
        metrics,
        finetunejobs=finetunejobs,
        limits=limits,
        clock=clock,
    )
    return Endpoint(cluster, server, sink, clock, metrics)


def _trainer_pod(endpoint: Endpoint) -> dict[str, Any]:
    return endpoint.cluster.objects[("Pod", "team", "demo-g1-train-0-abcde")]


@dataclass
class Answer:
    status: int
    body: dict[str, Any]
    retry_after: str | None


async def _post_all(
    endpoint: Endpoint, tokens: list[str], name: str = "demo", parallel: bool = False
) -> list[Answer]:
    runner = web.AppRunner(endpoint.server.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/progress/team/{name}"
    try:
        async with aiohttp.ClientSession() as session:

            async def post(token: str) -> Answer:
                headers = {"Authorization": f"Bearer {token}"}
                async with session.post(url, json={"step": 7}, headers=headers) as response:
                    return Answer(
                        response.status,
                        await response.json(),
                        response.headers.get("Retry-After"),
                    )

            if parallel:
                return list(await asyncio.gather(*(post(t) for t in tokens)))
            return [await post(token) for token in tokens]
    finally:
        await runner.cleanup()


def test_500_bad_token_requests_cost_at_most_the_burst_in_token_reviews() -> None:
    endpoint = _endpoint(ReviewLimits(source_rate=0.2, source_burst=5))
    repeated = ["the-same-bad-token"] * 250
    distinct = [f"bad-token-{i}" for i in range(250)]

    answers = asyncio.run(_post_all(endpoint, repeated + distinct))

    # The repeated token is reviewed once, then refused from memory; the distinct ones
    # spend the source's burst (4 left), then wait for tokens the frozen clock never earns.
    assert endpoint.cluster.requests["POST tokenreviews"] == 5
    assert endpoint.metrics.registry.get_sample_value("kubetune_progress_tokenreviews_total") == 5
    assert all(a.status == 401 for a in answers[:250])
    assert [a.status for a in answers[250:254]] == [401] * 4
    throttled = answers[254:]
    assert {a.status for a in throttled} == {429}
    assert all(a.retry_after == "5" and "too many" in a.body["error"] for a in throttled)
    assert endpoint.cluster.requests["GET Pod"] == 0


def test_a_source_earns_reviews_back_over_time() -> None:
    endpoint = _endpoint(ReviewLimits(source_rate=0.5, source_burst=1))
    first = asyncio.run(_post_all(endpoint, ["bad-1", "bad-2"]))
    endpoint.clock.now += 2.0  # one review earned
    later = asyncio.run(_post_all(endpoint, ["bad-3", "bad-4"]))
    assert [a.status for a in first + later] == [401, 429, 401, 429]
    assert endpoint.cluster.requests["POST tokenreviews"] == 2


def test_all_sources_together_are_held_to_the_total_budget() -> None:
    endpoint = _endpoint(
        ReviewLimits(source_rate=0.0, source_burst=2, total_rate=0.0, total_burst=10)
    )

    async def flood() -> Counter[int]:
        codes: Counter[int] = Counter()
        for source in range(100):
            for attempt in range(2):
                try:
                    await endpoint.server.authorize(
                        f"bad-{source}-{attempt}", f"10.0.{source}.1", "team", "demo"
                    )
                except Refused as refused:
                    codes[refused.status] += 1
        return codes

    codes = asyncio.run(flood())
    assert endpoint.cluster.requests["POST tokenreviews"] == 10
    assert codes == Counter({401: 10, 429: 190})


def test_reviews_in_flight_are_capped_and_the_queue_is_bounded() -> None:
    limits = ReviewLimits(source_burst=1000, total_burst=1000, in_flight=3, queued=5)
    endpoint = _endpoint(limits)
    endpoint.cluster.hold_reviews = asyncio.Event()

    async def scenario() -> list[int]:
        async def attempt(i: int) -> int:
            try:
                await endpoint.server.authorize(f"bad-{i}", "10.0.0.1", "team", "demo")
            except Refused as refused:
                return refused.status
            return 202

        tasks = [asyncio.create_task(attempt(i)) for i in range(20)]
        for _ in range(200):  # until the 12 beyond in-flight plus queued are answered
            await asyncio.sleep(0.01)
            if sum(t.done() for t in tasks) == 12:
                break
        assert endpoint.cluster.hold_reviews is not None
        endpoint.cluster.hold_reviews.set()
        return list(await asyncio.gather(*tasks))

    codes = asyncio.run(scenario())
    assert endpoint.cluster.most_in_flight == 3
    assert Counter(codes) == Counter({503: 12, 401: 8})


def test_concurrent_requests_with_one_token_share_one_review() -> None:
    endpoint = _endpoint()
    endpoint.cluster.review_latency = 0.2  # the others arrive while the first is reviewed
    answers = asyncio.run(_post_all(endpoint, ["one-bad-token"] * 50, parallel=True))
    assert {a.status for a in answers} == {401}
    assert endpoint.cluster.requests["POST tokenreviews"] == 1


def test_the_jobs_own_pod_keeps_reporting_through_a_flood() -> None:
    endpoint = _endpoint(ReviewLimits(source_rate=0.0, source_burst=2))
    good = endpoint.cluster.token_for(_trainer_pod(endpoint))
    flood = [f"bad-{i}" for i in range(100)]
    answers = asyncio.run(_post_all(endpoint, [good, *flood, good]))
    assert answers[0].status == answers[-1].status == 202
    assert endpoint.cluster.requests["POST tokenreviews"] == 2


def test_a_pods_default_token_for_the_api_server_is_refused() -> None:
    """Every pod holds a token for the API server's own audience. The review asks for the
    KubeTune audience only, and the answer's audiences are checked: either one alone keeps
    that token out; this fails only when both are gone."""
    endpoint = _endpoint()
    default_token = endpoint.cluster.token_for(_trainer_pod(endpoint), audience=API_AUDIENCE)
    right_token = endpoint.cluster.token_for(_trainer_pod(endpoint))

    answers = asyncio.run(_post_all(endpoint, [default_token, right_token]))

    assert [a.status for a in answers] == [401, 202]
    assert endpoint.cluster.reviews == [[AUDIENCE], [AUDIENCE]]


def test_the_review_asks_for_the_kubetune_audience_only() -> None:
    endpoint = _endpoint()
    other = endpoint.cluster.token_for(_trainer_pod(endpoint), audience="someone-else")
    answers = asyncio.run(_post_all(endpoint, [other]))
    assert answers[0].status == 401
    assert endpoint.cluster.reviews == [[AUDIENCE]]


def test_a_forged_trainer_pod_cannot_report_for_the_job() -> None:
    endpoint = _endpoint()
    job = endpoint.cluster.objects[("Job", "team", "demo-g1-train")]
    forged = _forged(job)
    endpoint.cluster.add(forged)
    token = endpoint.cluster.token_for(forged)

    answers = asyncio.run(_post_all(endpoint, [token, token]))

    assert [a.status for a in answers] == [403, 403]
    assert "not created by a training Job" in answers[0].body["error"]
    assert endpoint.cluster.requests["POST tokenreviews"] == 1  # the second: from memory
    assert endpoint.cluster.patches == []


def test_a_previous_generations_report_is_dropped_even_when_accepted_before() -> None:
    endpoint = _endpoint(min_interval=0.2)
    token = endpoint.cluster.token_for(_trainer_pod(endpoint))

    async def scenario() -> tuple[list[Answer], list[Answer]]:
        first = await _post_all(endpoint, [token, token])  # the second waits in the sink
        # The spec changes the model: generation 2 starts (its Job not even created yet).
        endpoint.cluster.add(_finetunejob(spec={**SPEC, "training": {"maxSteps": 500}}))
        later = await _post_all(endpoint, [token])
        for _ in range(200):
            await asyncio.sleep(0.01)
            if not endpoint.sink._tasks:
                break
        return first, later

    first, later = asyncio.run(scenario())
    assert [a.status for a in first] == [202, 202]
    assert later[0].status == 409 and "generation 1" in later[0].body["error"]
    assert len(endpoint.cluster.patches) == 1  # the accepted report still pending: dropped
    assert endpoint.sink.dropped == 1


def test_a_token_verified_for_one_job_is_refused_for_another() -> None:
    endpoint = _endpoint()
    token = endpoint.cluster.token_for(_trainer_pod(endpoint))
    endpoint.cluster.add(_finetunejob("other", "uid-other"))
    mine = asyncio.run(_post_all(endpoint, [token]))
    other = asyncio.run(_post_all(endpoint, [token], name="other"))
    assert (mine[0].status, other[0].status) == (202, 403)


def test_token_buckets_forget_the_oldest_source_first() -> None:
    clock = FakeClock()
    buckets = TokenBuckets(rate=0.0, burst=1, size=2, clock=clock)
    assert [buckets.take(s) for s in ("a", "b", "a")] == [0.0, 0.0, 3600.0]
    buckets.take("c")  # "b" is the oldest now and goes
    assert buckets.take("b") == 0.0


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


def test_budget_flags_reach_the_review_limits() -> None:
    parser = argparse.ArgumentParser()
    add_operator_command(parser.add_subparsers())
    assert review_limits_from_args(parser.parse_args(["operator"])) == ReviewLimits()
    flags = ["--progress-source-review-rate", "0.5", "--progress-source-review-burst", "2",
             "--progress-review-rate", "7", "--progress-review-burst", "9",
             "--progress-reviews-in-flight", "3"]  # fmt: skip
    limits = review_limits_from_args(parser.parse_args(["operator", *flags]))
    assert (limits.source_rate, limits.source_burst, limits.total_rate, limits.total_burst,
            limits.in_flight) == (0.5, 2, 7.0, 9, 3)  # fmt: skip


def test_a_repeated_refused_token_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    endpoint = _endpoint()
    job = endpoint.cluster.objects[("Job", "team", "demo-g1-train")]
    forged = _forged(job)
    endpoint.cluster.add(forged)
    token = endpoint.cluster.token_for(forged)
    with caplog.at_level("WARNING", logger="kubetune.operator.progress"):
        answers = asyncio.run(_post_all(endpoint, [token] * 100))
    assert {a.status for a in answers} == {403}
    assert len([r for r in caplog.records if "refused a progress report" in r.message]) == 1


def test_a_pod_that_posted_to_the_wrong_job_is_not_shut_out_of_its_own() -> None:
    endpoint = _endpoint()
    token = endpoint.cluster.token_for(_trainer_pod(endpoint))
    endpoint.cluster.add(_finetunejob("other", "uid-other"))
    wrong = asyncio.run(_post_all(endpoint, [token, token], name="other"))
    right = asyncio.run(_post_all(endpoint, [token]))
    assert [a.status for a in wrong] == [403, 403]
    assert right[0].status == 202
    # The wrong job's refusal was remembered (one review for it), the right one reviewed.
    assert endpoint.cluster.requests["POST tokenreviews"] == 2


class RecordedPatches:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def patch_status(self, _ns: str, _name: str, patch: dict[str, Any]) -> None:
        self.sent.append(patch)


def test_the_sinks_patch_is_the_whole_progress_of_the_reporting_generation() -> None:
    """Status is merge-patched: each key the report lacks is set to null (not left from an
    earlier report, or an earlier generation), and the progress names the generation of the
    trainer that reported it, so reconcile can tell it from an earlier generation's."""
    binding = Binding(namespace="ns", name="job", finetunejob_uid="u", job="job-g2-train",
                      job_uid="j", generation=2, training_hash="h", pod_uid="p")

    async def scenario() -> list[dict[str, Any]]:
        client = RecordedPatches()
        sink = ProgressSink(client, 0.0, lambda: "now")  # type: ignore[arg-type]
        sink.submit(("ns", "job"), ProgressReport(step=3, total_steps=10), binding)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if client.sent:
                break
        return client.sent

    (patch,) = asyncio.run(scenario())
    assert patch == {"progress": {
        "generation": 2, "step": 3, "totalSteps": 10, "percent": 30, "updateTime": "now",
        "epoch": None, "trainLoss": None, "evalLoss": None, "tokensPerSecond": None,
        "etaSeconds": None,
    }}  # fmt: skip
