"""Shared serving pools (`serving.share`): who is a member, what the pool serves, which adapter
calls bring a replica to the set, and what a member's pass applies and reports. No cluster."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from kubetune.api import FineTuneJobSpec
from kubetune.api.dataplane import AdapterSet, ServedAdapter
from kubetune.reconcile.decide import Observed, Outcome, reconcile
from kubetune.reconcile.pool import (
    AdapterRefusal,
    LoadAdapter,
    UnloadAdapter,
    adapter_calls,
    pools_of,
    refusal_message,
)
from tests.unit.operator_fixtures import (
    CONFIG,
    NOW,
    applied,
    as_observed,
    body,
    condition,
    deployment_status,
    job_status,
    merge_patched,
    plan,
    pod,
    spec_dict,
)

REPORT = {"status": "Succeeded", "steps": 20, "evalLoss": 1.1, "baseEvalLoss": 1.9}


def member(
    name: str,
    *,
    share: str = "team",
    created: str = "2026-01-01T00:00:00Z",
    status: dict[str, Any] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    serving = {"share": share, **spec.pop("serving", {})}
    job = body(spec_dict(serving=serving, **spec), status=status)
    job["metadata"].update(name=name, uid=f"uid-{name}", creationTimestamp=created)
    return job


def published(generation: int, pool: str = "team") -> dict[str, Any]:
    return {"serving": {"pool": pool, "modelGeneration": generation}}


# ---------------------------------------------------------------- membership


def test_lora_jobs_on_one_base_naming_one_pool_form_it() -> None:
    pools = pools_of([member("b"), member("a"), member("c", method="QLoRA")])
    assert list(pools.pools) == ["team"]
    assert [m.name for m in pools.pools["team"].members] == ["a", "b", "c"]
    assert pools.alone == {}


def test_models_that_are_no_adapter_are_served_alone_with_the_reason() -> None:
    pools = pools_of([member("lora"), member("dora", method="DoRA"),
                      member("full", method="Full")])
    assert [m.name for m in pools.pools["team"].members] == ["lora"]
    assert "DoRA" in pools.alone["dora"] and "merged export" in pools.alone["dora"]
    assert "Full trains every weight" in pools.alone["full"]


def test_a_later_job_on_another_base_is_served_alone_and_the_pool_keeps_its_base() -> None:
    first = member("first", created="2026-01-01T00:00:00Z")
    other = member("other", created="2026-01-02T00:00:00Z", serving={"precision": "FP32"})
    pools = pools_of([other, first])
    assert [m.name for m in pools.pools["team"].members] == ["first"]
    reason = pools.alone["other"]
    assert "first member first's" in reason and "FP32" in reason and "(Auto on CPU)" in reason


def test_a_pool_needs_a_base_it_can_export_and_no_per_job_calibration() -> None:
    hub = member("hub", model={"source": "hf://org/model"})
    gptq = member("gptq", serving={"precision": "INT4", "quantization": "GPTQ"})
    pools = pools_of([hub, gptq])
    assert pools.pools == {}
    assert "hf://org/model" in pools.alone["hub"]
    assert "GPTQ" in pools.alone["gptq"]


def test_jobs_naming_other_pools_or_none_are_apart() -> None:
    plain = body(spec_dict())
    plain["metadata"]["name"] = "plain"
    pools = pools_of([member("a", share="one"), member("b", share="two"), plain])
    assert {name: [m.name for m in p.members] for name, p in pools.pools.items()} == {
        "one": ["a"], "two": ["b"]}
    assert pools.pool_of("plain") is None


def test_a_job_being_deleted_is_no_member() -> None:
    going = member("going", status=published(1))
    going["metadata"]["deletionTimestamp"] = NOW
    pools = pools_of([member("stays", status=published(2)), going])
    assert [a.name for a in pools.pools["team"].adapter_set().adapters] == ["stays"]


def test_the_adapter_set_lists_published_members_at_their_generation() -> None:
    pools = pools_of([
        member("b", status=published(3)),
        member("a", status=published(1)),
        member("waiting"),
        # Published to another pool before it moved here: not this pool's adapter.
        member("moved", status=published(2, pool="elsewhere")),
    ])
    assert pools.pools["team"].adapter_set() == AdapterSet(adapters=[
        ServedAdapter(name="a", path="/adapters/a/gen-1"),
        ServedAdapter(name="b", path="/adapters/b/gen-3"),
    ])


# ---------------------------------------------------------------- adapter calls


def _set(**paths: str) -> AdapterSet:
    return AdapterSet(adapters=[ServedAdapter(name=n, path=p) for n, p in paths.items()])


def test_a_replica_loads_what_it_lacks_reloads_a_new_generation_and_unloads_the_rest() -> None:
    desired = _set(a="/adapters/a/gen-2", b="/adapters/b/gen-1", c="/adapters/c/gen-1")
    loaded = {"a": "/adapters/a/gen-1", "b": "/adapters/b/gen-1", "gone": "/adapters/gone/gen-4"}
    assert adapter_calls(desired, loaded) == [
        LoadAdapter("a", "/adapters/a/gen-2"),
        LoadAdapter("c", "/adapters/c/gen-1"),
        UnloadAdapter("gone"),
    ]


def test_a_replica_at_the_set_gets_no_call_and_an_unknown_one_reloads_all() -> None:
    desired = _set(a="/adapters/a/gen-2")
    assert adapter_calls(desired, {"a": "/adapters/a/gen-2"}) == []
    # Listed by the replica but not loaded by this operator (it restarted): loaded again.
    assert adapter_calls(desired, {"a": ""}) == [LoadAdapter("a", "/adapters/a/gen-2")]


def test_a_refusal_is_reported_to_its_job_only() -> None:
    refusals = [AdapterRefusal("pool-1", "a", "adapter 'a': DoRA ..."),
                AdapterRefusal("pool-2", "a", "adapter 'a': DoRA ...")]
    message = refusal_message(refusals, "a")
    assert message is not None and "pool-1, pool-2" in message and "DoRA" in message
    assert refusal_message(refusals, "b") is None


# ---------------------------------------------------------------- a member's pass


def _observe(
    job: dict[str, Any],
    children: list[dict[str, Any]] | None = None,
    peers: list[dict[str, Any]] | None = None,
    pool_children: list[dict[str, Any]] | None = None,
    adapter_refusal: str | None = None,
) -> Outcome:
    return reconcile(
        Observed(
            body=job,
            spec=FineTuneJobSpec.model_validate(job["spec"]),
            plan=plan(),
            plan_error=None,
            deepspeed={},
            missing=[],
            children=children or [],
            now=NOW,
            peers=peers or [],
            pool_children=pool_children or [],
            adapter_refusal=adapter_refusal,
        ),
        CONFIG,
    )


def _trained(job: dict[str, Any]) -> list[dict[str, Any]]:
    train = as_observed(applied(_observe(job), "Job")[0], job_status("Complete", succeeded=1))
    name = train["metadata"]["name"]
    return [train, pod(name, "Succeeded", message=json.dumps(REPORT))]


def _named(outcome: Outcome, kind: str, name: str) -> dict[str, Any]:
    return next(m for m in applied(outcome, kind) if m["metadata"]["name"] == name)


def test_a_trained_member_publishes_its_adapter_instead_of_exporting() -> None:
    job = member("a")
    outcome = _observe(job, _trained(job))
    jobs = [m["metadata"]["name"] for m in applied(outcome, "Job")]
    assert "a-g1-publish" in jobs and "a-g1-export" not in jobs
    assert "team-pool-base-export" in jobs
    # The base is not exported yet: the pool's pods would find nothing to copy.
    assert applied(outcome, "Deployment") == []
    assert outcome.pool is not None and outcome.pool.adapters.adapters == []


def test_a_member_that_passed_its_gate_waits_for_the_pools_base_export() -> None:
    job = member("a")
    children = _trained(job)
    publish = _named(_observe(job, children), "Job", "a-g1-publish")
    children.append(as_observed(publish, job_status("Complete", succeeded=1)))
    outcome = _observe(job, children, [job])
    serving = condition(outcome, "Serving")
    assert (serving["status"], serving["reason"]) == ("Unknown", "Deploying")
    assert "team-pool-base-export" in serving["message"]
    assert outcome.pool is not None and [a.name for a in outcome.pool.adapters.adapters] == ["a"]


def _pool_world(job: dict[str, Any], peers: list[dict[str, Any]]) -> tuple[
        list[dict[str, Any]], list[dict[str, Any]]]:
    """`job` trained and published, the pool's base exported, its Deployment available."""
    children = _trained(job)
    first = _observe(job, children, peers)
    publish = _named(first, "Job", "a-g1-publish")
    children.append(as_observed(publish, job_status("Complete", succeeded=1)))
    base = _named(first, "Job", "team-pool-base-export")
    pool_children = [as_observed(base, job_status("Complete", succeeded=1))]
    second = _observe(job, children, peers, pool_children)
    deployment = _named(second, "Deployment", "team-pool")
    pool_children.append(as_observed(deployment, deployment_status()))
    return children, pool_children


def test_a_member_that_passes_its_gate_is_in_the_set_and_names_the_shared_endpoint() -> None:
    job = member("a")
    peer = member("b", status=published(2))
    children, pool_children = _pool_world(job, [peer, job])
    outcome = _observe(job, children, [peer, job], pool_children)

    config_map = _named(outcome, "ConfigMap", "team-pool-adapters")
    assert json.loads(config_map["data"]["adapters.json"]) == {"adapters": [
        {"name": "a", "path": "/adapters/a/gen-1",
         "metrics": {"evalLoss": 1.1, "perplexity": pytest.approx(math.exp(1.1))}},
        # Its own pass writes its metrics; this one has none to keep for it.
        {"name": "b", "path": "/adapters/b/gen-2", "metrics": {}}]}
    assert outcome.pool is not None and len(outcome.pool.adapters.adapters) == 2
    status = merge_patched(job.get("status") or {}, outcome.status_patch)
    assert status["serving"] == {
        "deployment": "team-pool", "service": "team-pool",
        "endpoint": "http://team-pool.team.svc:8000/v1", "model": "a", "modelGeneration": 1,
        "readyReplicas": 1, "pool": "team"}
    assert condition(outcome, "Exported")["reason"] == "Published"
    assert condition(outcome, "Ready")["status"] == "True"
    # No Deployment of its own; the pool's objects are owned by both members.
    assert [m["metadata"]["name"] for m in applied(outcome, "Deployment")] == ["team-pool"]
    owners = config_map["metadata"]["ownerReferences"]
    assert [(o["name"], o["controller"]) for o in owners] == [("a", False), ("b", False)]


def test_an_adapter_the_pool_refused_fails_that_member_only() -> None:
    job = member("a")
    children, pool_children = _pool_world(job, [job])
    outcome = _observe(job, children, [job], pool_children,
                       adapter_refusal="the pool's server refused the adapter (p): bad")
    ready = condition(outcome, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "AdapterRefused")
    assert outcome.status_patch["serving"]["notSharedReason"].endswith(": bad")
    assert _named(outcome, "Deployment", "team-pool")  # the pool stays


def test_a_dora_job_naming_a_pool_gets_its_own_export_and_says_why() -> None:
    job = member("d", method="DoRA")
    outcome = _observe(job, _trained(job), [job, member("a")])
    assert "d-g1-export" in [m["metadata"]["name"] for m in applied(outcome, "Job")]
    assert outcome.pool is None
    reason = outcome.status_patch["serving"]["notSharedReason"]
    assert "DoRA" in reason
    assert outcome.status_patch["serving"]["model"] == "d"


def test_a_member_that_had_a_deployment_of_its_own_drops_it() -> None:
    job = member("a")
    own = {"apiVersion": "apps/v1", "kind": "Deployment",
           "metadata": {"name": "a-server", "namespace": "team",
                        "labels": {"app.kubernetes.io/component": "server",
                                   "kubetune.io/job": "a"}}}
    outcome = _observe(job, [*_trained(job), own], [job])
    assert {(c.kind, c.name) for c in outcome.delete} >= {
        ("Deployment", "a-server"), ("Service", "a-server")}


def test_a_peer_newer_in_the_applied_set_than_in_its_status_is_not_taken_back_out() -> None:
    """b's own pass put its generation 3 in the set; its status still says 2 when a's pass
    runs: a applies generation 3 (going back to 2 would unload b's new adapter)."""
    job = member("a")
    peer = member("b", status=published(2))
    children, pool_children = _pool_world(job, [peer, job])
    config_map = as_observed(_named(_observe(job, children, [peer, job], pool_children),
                                    "ConfigMap", "team-pool-adapters"))
    config_map["data"]["adapters.json"] = json.dumps({"adapters": [
        {"name": "b", "path": "/adapters/b/gen-3"}]})
    outcome = _observe(job, children, [peer, job], [*pool_children, config_map])
    assert outcome.pool is not None
    assert [(a.name, a.path) for a in outcome.pool.adapters.adapters] == [
        ("a", "/adapters/a/gen-1"), ("b", "/adapters/b/gen-3")]
    # Its status catching up changes nothing; a deleted peer is simply no member.
    later = _observe(job, children, [member("b", status=published(3)), job],
                     [*pool_children, config_map])
    assert later.pool == outcome.pool
    alone = _observe(job, children, [job], [*pool_children, config_map])
    assert alone.pool is not None and [a.name for a in alone.pool.adapters.adapters] == ["a"]


# ---------------------------------------------------------------- mustBeatServing in a pool

GATED = {"evaluation": {"task": "Classification", "labels": ["billing", "access"]},
         "serving": {"gate": {"mustBeatServing": True}}}


def _classified(macro_f1: float) -> str:
    return json.dumps({
        "status": "Succeeded", "steps": 20, "evalLoss": 0.7, "baseEvalLoss": 1.9,
        "task": "Classification",
        "metrics": {"values": {"accuracy": 0.8, "macroF1": macro_f1, "evalLoss": 0.7}},
        "baseMetrics": {"values": {"accuracy": 0.3, "macroF1": 0.2, "evalLoss": 1.9}},
    })


def _generation(job: dict[str, Any], generation: int, macro_f1: float,
                pool_children: list[dict[str, Any]]) -> tuple[Outcome, list[dict[str, Any]]]:
    """`job`'s generation `generation` trained (macroF1 `macro_f1`) and published: its pass,
    and its children."""
    train = as_observed(_named(_observe(job, [], [job], pool_children), "Job",
                               f"a-g{generation}-train"), job_status("Complete", succeeded=1))
    children = [train, pod(train["metadata"]["name"], "Succeeded",
                           message=_classified(macro_f1), generation=generation)]
    publish = _named(_observe(job, children, [job], pool_children), "Job",
                     f"a-g{generation}-publish")
    children.append(as_observed(publish, job_status("Complete", succeeded=1)))
    return _observe(job, children, [job], pool_children), children


def _gated_member_serving_generation_1() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Member `a` (gate mustBeatServing) whose generation 1 (macroF1 0.7) passed and is in the
    pool's set: its status and the pool's objects as observed."""
    job = member("a", **GATED)
    first, _ = _generation(job, 1, 0.7, [])
    base = as_observed(_named(first, "Job", "team-pool-base-export"),
                       job_status("Complete", succeeded=1))
    served, _ = _generation(job, 1, 0.7, [base])
    pool_children = [base, as_observed(_named(served, "Deployment", "team-pool"),
                                       deployment_status()),
                     as_observed(_named(served, "ConfigMap", "team-pool-adapters"))]
    ready, _ = _generation(job, 1, 0.7, pool_children)
    return dict(merge_patched({}, ready.status_patch)), pool_children


def _generation_2(macro_f1: float) -> Outcome:
    status, pool_children = _gated_member_serving_generation_1()
    assert status["serving"]["modelGeneration"] == 1
    job = member("a", status=status, training={"epochs": 2}, **GATED)
    job["metadata"]["generation"] = 2
    outcome, _ = _generation(job, 2, macro_f1, pool_children)
    return outcome


def test_the_pools_set_keeps_each_served_adapters_metrics() -> None:
    _, pool_children = _gated_member_serving_generation_1()
    (entry,) = AdapterSet.parse(pool_children[-1]["data"]["adapters.json"]).adapters
    assert (entry.path, entry.metrics["macroF1"]) == ("/adapters/a/gen-1", 0.7)


def test_a_member_generation_that_does_not_beat_its_served_adapter_is_not_swapped_in() -> None:
    """Before, a pool member's mustBeatServing compared with nothing (the pool's Deployment
    names no member's metrics) and every generation passed."""
    outcome = _generation_2(0.6)
    ready = condition(outcome, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "GateFailed")
    assert "macroF1 0.6 does not beat the serving model's 0.7" in ready["message"]
    assert outcome.pool is not None
    assert [(a.path, a.metrics["macroF1"]) for a in outcome.pool.adapters.adapters] == [
        ("/adapters/a/gen-1", 0.7)]


def test_a_member_generation_that_beats_its_served_adapter_replaces_it() -> None:
    outcome = _generation_2(0.85)
    assert "macroF1 0.85 beats the serving model's 0.7" in (
        outcome.status_patch["evaluation"]["message"])
    assert outcome.pool is not None
    assert [(a.path, a.metrics["macroF1"]) for a in outcome.pool.adapters.adapters] == [
        ("/adapters/a/gen-2", 0.85)]
