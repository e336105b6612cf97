"""Shared builders of FineTuneJob bodies and observed children for the operator unit tests."""

from __future__ import annotations

import json
from typing import Any

from kubetune.api import FineTuneJobSpec, PlanStatus
from kubetune.builders.config import OperatorConfig
from kubetune.reconcile.attach import PodEvent
from kubetune.reconcile.decide import Observed, Outcome, reconcile
from kubetune.reconcile.refusals import Refusal

NOW = "2026-01-01T00:00:00Z"
CONFIG = OperatorConfig(allow_pod_metadata=True)


def spec_dict(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"source": "builtin://smollm2-135m-instruct"},
        "dataset": {"source": "builtin://kubectl-commands"},
    }
    spec.update(overrides)
    return spec


def plan(world_size: int = 1) -> PlanStatus:
    return PlanStatus(
        world_size=world_size,
        zero_stage=2,
        micro_batch_size=1,
        gradient_accumulation_steps=4,
        global_batch_size=4 * world_size,
        estimated_gpu_memory_gib="3.5",
        reason="fits",
    )


def body(
    spec: dict[str, Any] | None = None,
    *,
    generation: int = 1,
    status: dict[str, Any] | None = None,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {
            "name": "demo",
            "namespace": "team",
            "uid": "uid-1",
            "generation": generation,
            "labels": labels or {},
            "annotations": annotations or {},
        },
        "spec": spec or spec_dict(),
    }
    if status is not None:
        result["status"] = status
    return result


def observe(
    job_body: dict[str, Any],
    children: list[dict[str, Any]] | None = None,
    *,
    missing: list[str] | None = None,
    plan_error: str | None = None,
    now: str = NOW,
    refused: list[Refusal] | None = None,
    events: list[PodEvent] | None = None,
) -> Outcome:
    spec = FineTuneJobSpec.model_validate(job_body["spec"])
    resolved = (
        None if plan_error else plan(spec.resources.nodes * max(1, spec.resources.gpus_per_node))
    )
    return reconcile(
        Observed(
            body=job_body,
            spec=spec,
            plan=resolved,
            plan_error=plan_error,
            deepspeed={"zero_optimization": {"stage": 2}},
            missing=missing or [],
            children=children or [],
            now=now,
            refused=refused or [],
            events=events or [],
        ),
        CONFIG,
    )


def applied(outcome: Outcome, kind: str) -> list[dict[str, Any]]:
    return [m for m in outcome.apply if m["kind"] == kind]


def uid_of(name: str) -> str:
    """The uid the API server gave the child `name` in these tests (pods' owners use it)."""
    return f"uid-{name}"


def as_observed(manifest: dict[str, Any], status: dict[str, Any] | None = None) -> dict[str, Any]:
    """A manifest as the index would hold it after the API server stored it."""
    observed = json.loads(json.dumps(manifest))
    observed["metadata"].setdefault("uid", uid_of(observed["metadata"]["name"]))
    observed["metadata"]["resourceVersion"] = "1"
    observed["metadata"]["generation"] = 1
    observed["status"] = status or {}
    return observed


def pod(
    job_name: str,
    phase: str,
    *,
    index: str = "0",
    message: str | None = None,
    exit_code: int = 0,
    generation: int = 1,
    unschedulable: str | None = None,
    owner_uid: str | None = "",
) -> dict[str, Any]:
    """A pod of Job `job_name`, its controller reference set as the Job controller sets it
    (`owner_uid` "" is that Job's uid as `as_observed` gives it; None: no owner at all)."""
    status: dict[str, Any] = {"phase": phase}
    if phase in ("Succeeded", "Failed"):
        terminated: dict[str, Any] = {"exitCode": exit_code, "finishedAt": NOW}
        if message is not None:
            terminated["message"] = message
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": terminated}}]
    if unschedulable:
        status["conditions"] = [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": unschedulable,
            }
        ]
    component = "exporter" if job_name.endswith("export") else "trainer"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{job_name}-{index}-abcde",
            "namespace": "team",
            "uid": f"pod-{job_name}-{index}",
            "labels": {
                "batch.kubernetes.io/job-name": job_name,
                "kubetune.io/job": "demo",
                "app.kubernetes.io/component": component,
                "kubetune.io/generation": str(generation),
            },
            "annotations": {"batch.kubernetes.io/job-completion-index": index},
            "ownerReferences": [] if owner_uid is None else [{
                "apiVersion": "batch/v1", "kind": "Job", "name": job_name,
                "uid": owner_uid or uid_of(job_name), "controller": True,
                "blockOwnerDeletion": True,
            }],
        },
        "status": status,
    }  # fmt: skip


def job_status(condition: str | None = None, reason: str = "", **counts: int) -> dict[str, Any]:
    status: dict[str, Any] = dict(counts)
    if condition:
        status["conditions"] = [{"type": condition, "status": "True", "reason": reason}]
    return status


def deployment_status(replicas: int = 1, available: int = 1, updated: int = 1) -> dict[str, Any]:
    return {
        "observedGeneration": 1,
        "replicas": replicas,
        "updatedReplicas": updated,
        "availableReplicas": available,
        "readyReplicas": available,
    }


def merge_patched(target: Any, patch: Any) -> Any:
    """`target` after the JSON merge patch `patch` (RFC 7386, section 2), as the API server
    applies a status patch: objects merge key by key, at every depth; null removes a key;
    anything else (lists included) replaces the value whole. `target` is not changed."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patched(result.get(key), value)
    return result


def condition(outcome_or_status: Any, kind: str) -> dict[str, Any]:
    status = (
        outcome_or_status.status_patch
        if isinstance(outcome_or_status, Outcome)
        else outcome_or_status
    )
    for cond in status["conditions"]:
        if cond["type"] == kind:
            return dict(cond)
    raise AssertionError(f"no {kind} condition in {status['conditions']}")
