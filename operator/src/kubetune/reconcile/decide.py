"""The operator's decisions: observed FineTuneJob + children -> desired children + status.

Pure (no I/O, no clock, no kopf), so every branch is tested without a cluster. The caller
(`kubetune.operator.controller`) gathers the observation, applies `Outcome.apply` with server-side
apply, deletes `Outcome.delete`, merge-patches `Outcome.status_patch` and posts the events.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from kubetune.api import ConditionType, FineTuneJobSpec, Phase, PlanStatus
from kubetune.api.dataplane import AdapterSet, ExportReport, TrainingReport
from kubetune.api.metrics import Metric, MetricScores
from kubetune.api.status import TrainingStatus
from kubetune.builders import naming
from kubetune.builders.config import OperatorConfig
from kubetune.builders.export import export_job
from kubetune.builders.meta import Manifest, Owner, legacy_training_hash, training_hash
from kubetune.builders.pool import PoolOwners, pool_objects, publish_job
from kubetune.builders.serving import serving_deployment, serving_service
from kubetune.builders.training import (
    artifacts_claim,
    rendezvous_service,
    run_config_map,
    training_job,
)
from kubetune.reconcile.attach import (
    PodEvent,
    attach_failure,
    run_with_attach_failure,
    serving_with_attach_failure,
)
from kubetune.reconcile.children import (
    ChildRef,
    current_generation,
    named,
    of_component,
    pods_of_job,
    stale_children,
    training_generation,
)
from kubetune.reconcile.conditions import Cond, Event, merge, phase, transitions
from kubetune.reconcile.gate import evaluate_gate, fine_tuned_scores
from kubetune.reconcile.pool import (
    AppliedAdapter,
    Pool,
    PoolJob,
    applied_adapters,
    pools_of,
)
from kubetune.reconcile.readiness import (
    export_condition,
    ready_condition,
    serving_condition,
    training_condition,
)
from kubetune.reconcile.refusals import Refusal, refusal_conditions
from kubetune.reconcile.runs import RunState, RunStatus, export_report, run_status
from kubetune.reconcile.status import (
    ServingView,
    build_status,
    of_generation,
    recorded_training,
    served_scores,
    serving_view,
    status_patch,
)

# ChildRef and current_generation are imported from here by callers and tests too.
__all__ = [
    "ChildRef",
    "Observed",
    "Outcome",
    "current_generation",
    "needs_reference_check",
    "reconcile",
]

T = ConditionType


@dataclass(frozen=True)
class Observed:
    """Everything reconcile looks at, gathered by the caller."""

    body: Mapping[str, Any]
    """The FineTuneJob as read (metadata, spec, status)."""
    spec: FineTuneJobSpec
    plan: PlanStatus | None
    plan_error: str | None
    deepspeed: dict[str, Any]
    missing: Sequence[str]
    """Referenced objects that do not exist, e.g. `Secret "hf-token"`."""
    children: Sequence[Mapping[str, Any]]
    """Objects labelled `kubetune.io/job=<name>` (Jobs, Pods, Deployments, ...), with `kind`."""
    now: str
    """RFC 3339 time, for condition transitions."""
    refused: Sequence[Refusal] = ()
    """Children the API server refused to store, as the applier remembers them."""
    events: Sequence[PodEvent] = ()
    """The namespace's volume-attach failures, listed while a pod of this job waits for its
    volumes (`kubetune.reconcile.attach`)."""
    peers: Sequence[Mapping[str, Any]] = ()
    """The namespace's FineTuneJobs (this one's body included or not): read only when the spec
    names a pool (`serving.share`), to form it (`kubetune.reconcile.pool`)."""
    pool_children: Sequence[Mapping[str, Any]] = ()
    """The objects of the pool the spec names (label `kubetune.io/pool`), with `kind`."""
    adapter_refusal: str | None = None
    """What the pool's server said when it refused this job's adapter, as the operator's
    last load found it; None when it loaded or was not asked."""


@dataclass(frozen=True)
class PoolTarget:
    """A pool this pass applied: what its replicas must have loaded."""

    pool: str
    adapters: AdapterSet


@dataclass
class Outcome:
    apply: list[Manifest] = field(default_factory=list)
    delete: list[ChildRef] = field(default_factory=list)
    status_patch: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    pool: PoolTarget | None = None
    """Set when this job is a pool member: the caller brings the pool's Ready replicas to
    `adapters` (`kubetune.operator.adapters`)."""


def needs_reference_check(body: Mapping[str, Any]) -> bool:
    """Look Secrets/PVCs up only until this spec generation has been validated once."""
    generation = (body.get("metadata") or {}).get("generation")
    for cond in (body.get("status") or {}).get("conditions") or ():
        if cond.get("type") == T.VALIDATED.value:
            return not (
                cond.get("status") == "True" and cond.get("observedGeneration") == generation
            )
    return True


FINISHED = frozenset({RunState.SUCCEEDED, RunState.FAILED})
"""Run states in which a Job's work is over."""


def reconcile(obs: Observed, config: OperatorConfig) -> Outcome:
    owner = Owner.from_body(obs.body)
    spec = obs.spec
    spec_generation = int(obs.body["metadata"].get("generation") or 1)
    previous = obs.body.get("status") or {}
    spec_hash = training_hash(spec)
    problems = [f"{item} not found" for item in obs.missing]
    if obs.plan_error:
        problems.append(obs.plan_error)
    valid = not problems and obs.plan is not None
    generation = training_generation(
        recorded_training(previous),
        obs.children,
        (spec_hash, legacy_training_hash(spec)),
        spec_generation,
        valid,
    )
    # An invalid spec stops nothing: the running generation's children stay (see below).
    outcome = Outcome(delete=stale_children(obs.children, generation) if valid else [])
    endpoint = naming.endpoint_url(naming.serving_name(owner.name), owner.namespace)
    conds: dict[ConditionType, Cond] = {}

    training: RunStatus | None = None
    export: RunStatus | None = None
    gate: tuple[bool, str] | None = None
    compared: MetricScores | None = None
    report: TrainingReport | None = None
    exported: ExportReport | None = None
    view = serving_view(
        of_component(obs.children, "Deployment", naming.COMPONENT_SERVER),
        previous,
        of_component(obs.children, "Pod", naming.COMPONENT_SERVER),
    )
    trainers = of_component(obs.children, "Job", naming.COMPONENT_TRAINER)
    job = named(trainers, naming.training_job_name(owner.name, generation))
    exporters = of_component(obs.children, "Job", naming.COMPONENT_EXPORTER)
    exporter = named(exporters, naming.export_job_name(owner.name, generation))
    # With an invalid spec the Deployment is neither applied nor deleted, so it is reported as
    # it runs, even when the same edit turned serving off.
    serving_enabled = spec.serving.enabled or (not valid and view.exists)
    pool, not_shared = _membership(obs, owner.name)
    applied_set: dict[str, AppliedAdapter] = {}
    if pool is not None:
        publishers = of_component(obs.children, "Job", naming.COMPONENT_PUBLISHER)
        exporter = named(publishers, naming.publish_job_name(owner.name, generation))
        endpoint = naming.endpoint_url(naming.pool_server_name(pool.name), owner.namespace)
        applied_set = applied_adapters(
            named(of_component(obs.pool_children, "ConfigMap", naming.COMPONENT_POOL_ADAPTERS),
                  naming.pool_config_map_name(pool.name))
        )
        view = _pool_view(obs, pool.name, previous,
                          applied_set.get(naming.served_model_name(owner.name)))

    if not valid or obs.plan is None:  # valid implies a plan; mypy needs it said
        # Nothing is created, applied or deleted until the spec is valid again: the
        # generation under way (its training Job, run ConfigMap, rendezvous Service, export,
        # and the Deployment) goes on as it was, and its status keeps being reported.
        reason = "MissingReference" if obs.missing else "DoesNotFit"
        message = "; ".join(problems) or "the job cannot be planned"
        if job is not None:
            training = run_status(job, pods_of_job(obs.children, job), "training")
            report = _report(training, previous, generation)
            conds[T.TRAINED] = training_condition(training, report)
        else:
            conds[T.TRAINED] = Cond(
                T.TRAINED, "Unknown", "NotValidated", "training waits for validation"
            )
        if exporter is not None:
            export_pods = pods_of_job(obs.children, exporter)
            export = run_status(exporter, export_pods, "export")
            exported = export_report(export_pods) if export.state is RunState.SUCCEEDED else None
        if any(run is not None and run.state not in FINISHED for run in (training, export)):
            message += f"; generation {generation} keeps running"
        conds[T.VALIDATED] = Cond(
            T.VALIDATED, "False", reason, f"the spec is invalid: {message}"
        )
    else:
        conds[T.VALIDATED] = Cond(T.VALIDATED, "True", "Valid", obs.plan.reason or "the job fits")
        if not spec.storage.claim_name:
            claims = of_component(obs.children, "PersistentVolumeClaim", naming.COMPONENT_STORAGE)
            existing = named(claims, naming.artifacts_claim_name(owner.name)) or {}
            modes = (existing.get("spec") or {}).get("accessModes")
            outcome.apply.append(artifacts_claim(owner, spec, config, modes))
        outcome.apply.append(
            run_config_map(owner, generation, spec, obs.plan, obs.deepspeed)
        )
        outcome.apply.append(rendezvous_service(owner, generation))
        outcome.apply.append(training_job(owner, generation, spec, config, spec_hash))
        trainer_pods = pods_of_job(obs.children, job)
        training = run_with_attach_failure(
            run_status(job, trainer_pods, "training"),
            attach_failure(trainer_pods, obs.events),
            "training",
        )
        report = _report(training, previous, generation)
        conds[T.TRAINED] = training_condition(training, report)
        if training.state is RunState.SUCCEEDED and spec.serving.enabled:
            outcome.apply.append(
                export_job(owner, generation, spec, config)
                if pool is None
                # A pool member's model is its adapter, on the pool's base: published, not
                # merged and exported on its own.
                else publish_job(owner, generation, spec, config)
            )
            export_pods = pods_of_job(obs.children, exporter)
            export = run_with_attach_failure(
                run_status(exporter, export_pods, "export"),
                attach_failure(export_pods, obs.events),
                "export",
            )
            if pool is None and export.state is RunState.SUCCEEDED:
                exported = export_report(export_pods)
        if export is not None and export.state is RunState.SUCCEEDED:
            # The model serving now, when it is another generation's: the one to beat.
            if view.exists and view.template_generation != generation:
                compared = view.scores
            measured = report or TrainingReport()
            gate = evaluate_gate(spec.serving.gate, spec.evaluation.task, measured, compared)

    conds[T.EXPORTED] = export_condition(export, serving_enabled)
    if pool is not None and conds[T.EXPORTED].status == "True":
        conds[T.EXPORTED] = Cond(T.EXPORTED, "True", "Published",
                                 f"adapter published to pool {pool.name}")
    model_generation, model_loss = view.template_generation, view.eval_loss
    model_scores = view.scores
    if gate is not None and gate[0]:
        model_generation = generation
        loss = report.eval_loss if report is not None else None
        model_loss = None if loss is None else str(loss)
        model_scores = MetricScores(values=fine_tuned_scores(report)) if report else None
    if pool is not None:
        if valid:
            outcome.pool = _apply_pool(outcome, obs, pool, owner.name, model_generation,
                                       model_scores, applied_set, config)
            # Served by the pool now: a Deployment of its own from before goes.
            if of_component(obs.children, "Deployment", naming.COMPONENT_SERVER):
                name = naming.serving_name(owner.name)
                outcome.delete += [
                    ChildRef("v1", "Service", name),
                    ChildRef("apps/v1", "Deployment", name),
                ]
        view = _with_model(view, model_generation)
    # With an invalid spec the Deployment runs on as it is (see above).
    elif valid and spec.serving.enabled and model_generation is not None:
        outcome.apply.append(
            serving_deployment(owner, model_generation, model_loss, spec, config, model_scores)
        )
        outcome.apply.append(serving_service(owner))
        if model_generation != view.template_generation:
            view = view.rolling_to(model_generation)
    elif valid and not spec.serving.enabled:
        if of_component(obs.children, "Deployment", naming.COMPONENT_SERVER):
            name = naming.serving_name(owner.name)
            outcome.delete += [
                ChildRef("v1", "Service", name),
                ChildRef("apps/v1", "Deployment", name),
            ]
        view = ServingView()
    conds[T.SERVING] = serving_with_attach_failure(
        serving_condition(view, serving_enabled, endpoint),
        attach_failure(of_component(obs.children, "Pod", naming.COMPONENT_SERVER), obs.events),
    )
    if pool is not None and model_generation is not None and not view.exists:
        # Its adapter is in the set; the pool's server starts once the base is exported.
        conds[T.SERVING] = Cond(
            T.SERVING, "Unknown", "Deploying",
            f"pool {pool.name}'s server starts once its base is exported "
            f"({naming.pool_base_export_job_name(pool.name)})",
        )
    conds.update(refusal_conditions(outcome.apply, obs.refused))
    conds[T.READY] = ready_condition(conds, generation, serving_enabled, gate, view)
    if pool is not None and obs.adapter_refusal is not None:
        # The pool serves on; only this member is not served.
        conds[T.READY] = Cond(T.READY, "False", "AdapterRefused",
                              f"generation {generation}: {obs.adapter_refusal}")

    merged = merge(previous.get("conditions"), conds.values(), spec_generation, obs.now)
    status = build_status(
        owner=owner,
        spec=spec,
        plan=obs.plan,
        generation=spec_generation,
        training_generation=generation,
        # Recorded when the generation starts and on every valid pass after; an invalid
        # spec trains nothing, so the record stays that of the generation under way.
        training_record=TrainingStatus(generation=generation, training_hash=spec_hash)
        if valid
        else None,
        serving_enabled=serving_enabled,
        phase=phase(conds),
        conditions=merged,
        training=training,
        report=report,
        export_result=exported,
        gate=gate,
        view=view,
        endpoint=endpoint,
        previous=previous,
        compared_scores=compared,
        pool=pool.name if pool is not None else None,
        not_shared_reason=not_shared if pool is None else obs.adapter_refusal,
    )
    outcome.status_patch = status_patch(previous, status)
    outcome.events = transitions(previous.get("conditions"), merged)
    return outcome


def _membership(obs: Observed, name: str) -> tuple[Pool | None, str | None]:
    """(the pool serving this job, why a job naming a pool is served on its own)."""
    if obs.spec.serving.share is None or not obs.spec.serving.enabled:
        return None, None
    # This pass's body, not the index's copy of it (it may be older).
    peers = [p for p in obs.peers if (p.get("metadata") or {}).get("name") != name]
    pools = pools_of([*peers, obs.body])
    return pools.pool_of(name), pools.alone.get(name)


def _pool_view(
    obs: Observed, pool: str, previous: Mapping[str, Any], applied: AppliedAdapter | None
) -> ServingView:
    """The pool's Deployment as this member sees it: the generation it serves is the member's
    own published one, not a template annotation (the pool's template names no member), and
    its scores are those kept with that generation's adapter in the pool's set (`applied`)."""
    deployments = of_component(obs.pool_children, "Deployment", naming.COMPONENT_POOL_SERVER)
    pods = of_component(obs.pool_children, "Pod", naming.COMPONENT_POOL_SERVER)
    kept = previous.get("serving") or {}
    mine = kept.get("modelGeneration") if kept.get("pool") == obs.spec.serving.share else None
    view = serving_view(deployments, {}, pods)
    recorded = applied.metrics if applied is not None and applied.generation == mine else {}
    return dataclasses.replace(view, template_generation=mine, eval_loss=None,
                               scores=served_scores(dict(recorded), None))


def _with_model(view: ServingView, model_generation: int | None) -> ServingView:
    """A member is served once its adapter is in the set and a pool replica is available
    (the replicas load it within the pass that puts it there); before its first adapter
    passed its gate, the pool's Deployment is not yet its."""
    if not view.exists or model_generation is None:
        return ServingView()
    serving = model_generation if view.available_replicas > 0 else None
    return dataclasses.replace(view, template_generation=model_generation,
                               serving_generation=serving)


def _apply_pool(
    outcome: Outcome,
    obs: Observed,
    pool: Pool,
    name: str,
    model_generation: int | None,
    model_scores: MetricScores | None,
    applied_set: Mapping[str, AppliedAdapter],
    config: OperatorConfig,
) -> PoolTarget:
    """The pool's objects as this member sees them, with its own model generation (and its
    scores) as this pass decided it (its status may not say so yet)."""
    scores = model_scores.values if model_scores is not None else {}
    members = tuple(
        dataclasses.replace(
            member,
            published_generation=model_generation,
            published_metrics={str(metric): value for metric, value in scores.items()},
        )
        if member.name == name
        else _as_applied(member, applied_set.get(naming.served_model_name(member.name)))
        for member in pool.members
    )
    pool = dataclasses.replace(pool, members=members)
    namespace = obs.body["metadata"]["namespace"]
    owners = PoolOwners(
        pool=pool.name,
        namespace=namespace,
        members=tuple(Owner(m.name, namespace, m.uid) for m in members),
    )
    base_jobs = of_component(obs.pool_children, "Job", naming.COMPONENT_POOL_BASE)
    base_job = named(base_jobs, naming.pool_base_export_job_name(pool.name))
    base_exported = (
        base_job is not None
        and run_status(base_job, pods_of_job(obs.pool_children, base_job), "export").state
        is RunState.SUCCEEDED
    )
    adapters = pool.adapter_set()
    outcome.apply += pool_objects(owners, pool.founder.spec, adapters, config, base_exported)
    return PoolTarget(pool.name, adapters)


def _as_applied(member: PoolJob, applied: AppliedAdapter | None) -> PoolJob:
    """Another member as this pass writes it into the set: the newer of its status and the set
    as applied (its own pass may have put a new generation in the set before its status says
    so, and this pass must not take it back out: the replicas would unload it until that pass
    ran again), with the metrics the set keeps for that generation."""
    applied_generation = applied.generation if applied is not None else None
    generation = _newer(member.published_generation, applied_generation)
    metrics = applied.metrics if applied is not None and generation == applied_generation else {}
    return dataclasses.replace(member, published_generation=generation, published_metrics=metrics)


def _newer(first: int | None, second: int | None) -> int | None:
    return max((g for g in (first, second) if g is not None), default=None)


def _report(
    training: RunStatus, previous: Mapping[str, Any], generation: int
) -> TrainingReport | None:
    """The final report: from the pod while it exists, else what status kept of it.

    Status holds only what this training generation measured (`build_status` removes the
    numbers of an earlier one), so a number missing there was not measured, and the gate
    fails on it rather than reading an earlier generation's."""
    if training.state is not RunState.SUCCEEDED:
        return None
    if training.report is not None:
        return training.report
    evaluation = previous.get("evaluation") or {}
    if evaluation.get("generation") != generation:
        return None
    # Written from the pod's report in the same pass as the evaluation.
    kept_progress = previous.get("progress")
    progress: Mapping[str, Any] = {}
    if isinstance(kept_progress, Mapping) and of_generation(kept_progress, generation):
        progress = kept_progress
    steps = progress.get("step")
    kept = {
        "evalLoss": evaluation.get("evalLoss"),
        "baseEvalLoss": evaluation.get("baseEvalLoss"),
        "accuracy": evaluation.get("accuracy"),
        "baseAccuracy": evaluation.get("baseAccuracy"),
        "trainLoss": progress.get("trainLoss"),
        "tokensPerSecond": progress.get("tokensPerSecond"),
    }
    # status keeps the numbers as decimal strings; the report model reads them as floats
    numbers = {key: _float(value) for key, value in kept.items()}
    fine_tuned, base = _kept_scores(evaluation)
    return TrainingReport.model_validate(
        {key: number for key, number in numbers.items() if number is not None}
        | ({"steps": steps} if isinstance(steps, int) and steps >= 0 else {})
        | {"status": "Succeeded", "metrics": fine_tuned, "baseMetrics": base}
    )


def _kept_scores(evaluation: Mapping[str, Any]) -> tuple[MetricScores | None, MetricScores | None]:
    """The fine-tuned and the base model's metrics as `status.evaluation` kept them
    (`metrics`, `perLabelF1`); None for a model it kept none of."""
    names = {metric.value for metric in Metric}
    sides: dict[str, MetricScores] = {"fineTuned": MetricScores(), "base": MetricScores()}
    for row in _rows(evaluation.get("metrics")):
        for side, scores in sides.items():
            number = _float(row.get(side))
            if row.get("name") in names and number is not None:
                scores.values[Metric(row["name"])] = number
    for row in _rows(evaluation.get("perLabelF1")):
        for side, scores in sides.items():
            number = _float(row.get(side))
            if isinstance(row.get("label"), str) and number is not None:
                scores.per_label_f1[row["label"]] = number
    fine_tuned, base = sides["fineTuned"], sides["base"]
    return (fine_tuned if fine_tuned.values or fine_tuned.per_label_f1 else None,
            base if base.values or base.per_label_f1 else None)


def _rows(value: Any) -> list[Mapping[str, Any]]:
    """The objects of a list in status; nothing for what is not one (edited by hand)."""
    return [row for row in value if isinstance(row, Mapping)] if isinstance(value, list) else []


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def invalid_spec_status(
    body: Mapping[str, Any], error: ValidationError, now: str
) -> dict[str, Any]:
    """The status of a FineTuneJob whose spec the models refuse (an object stored before the
    CRD's schema caught the problem): Invalid, with every field named."""
    generation = body["metadata"].get("generation")
    message = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
    )[:1024]
    return {
        "observedGeneration": generation,
        "phase": Phase.INVALID.value,
        "conditions": [
            {
                "type": ConditionType.VALIDATED.value,
                "status": "False",
                "reason": "InvalidSpec",
                "message": message,
                "observedGeneration": generation,
                "lastTransitionTime": now,
            }
        ],
    }
