"""The operator's decisions: observed FineTuneJob + children -> desired children + status.

Pure (no I/O, no clock, no kopf), so every branch is tested without a cluster. The caller
(`kubetune.controller`) gathers the observation, applies `Outcome.apply` with server-side
apply, deletes `Outcome.delete`, merge-patches `Outcome.status_patch` and posts the events.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubetune import builders, naming
from kubetune.api import ConditionType, FineTuneJobSpec, PlanStatus
from kubetune.builders.meta import Manifest, Owner
from kubetune.conditions import Cond, Event, merge, phase, transitions
from kubetune.gate import evaluate_gate
from kubetune.observe import RunState, RunStatus, run_status
from kubetune.operator_config import OperatorConfig
from kubetune.status_view import ServingView, build_status, serving_view

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


@dataclass(frozen=True)
class ChildRef:
    api_version: str
    kind: str
    name: str


@dataclass
class Outcome:
    apply: list[Manifest] = field(default_factory=list)
    delete: list[ChildRef] = field(default_factory=list)
    status_patch: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


def _of(
    children: Sequence[Mapping[str, Any]], kind: str, component: str
) -> list[Mapping[str, Any]]:
    return [
        c
        for c in children
        if c.get("kind") == kind and _labels(c).get(naming.LABEL_COMPONENT) == component
    ]


def _named(objs: Sequence[Mapping[str, Any]], name: str) -> Mapping[str, Any] | None:
    return next((o for o in objs if o["metadata"]["name"] == name), None)


def _generation_of(obj: Mapping[str, Any]) -> int | None:
    value = _labels(obj).get(naming.LABEL_GENERATION)
    return int(value) if value and value.isdigit() else None


def current_generation(
    children: Sequence[Mapping[str, Any]], training_hash: str, spec_generation: int
) -> int:
    """The training generation: the newest training Job's, while its training hash still
    matches the spec; a new one (the spec's generation) otherwise. Suspending changes the
    spec generation but not the training hash, so a resumed run keeps its generation."""
    jobs = _of(children, "Job", naming.COMPONENT_TRAINER)
    matching = [
        _generation_of(j)
        for j in jobs
        if (j["metadata"].get("annotations") or {}).get(naming.ANNOTATION_TRAINING_HASH)
        == training_hash
    ]
    found = [g for g in matching if g is not None]
    return max(found) if found else spec_generation


def needs_reference_check(body: Mapping[str, Any]) -> bool:
    """Look Secrets/PVCs up only until this spec generation has been validated once."""
    generation = (body.get("metadata") or {}).get("generation")
    for cond in (body.get("status") or {}).get("conditions") or ():
        if cond.get("type") == T.VALIDATED.value:
            return not (
                cond.get("status") == "True" and cond.get("observedGeneration") == generation
            )
    return True


def _pods_of(children: Sequence[Mapping[str, Any]], job_name: str) -> list[Mapping[str, Any]]:
    return [
        c
        for c in children
        if c.get("kind") == "Pod" and _labels(c).get("batch.kubernetes.io/job-name") == job_name
    ]


def _stale_children(children: Sequence[Mapping[str, Any]], generation: int) -> list[ChildRef]:
    """Training children of other generations. ConfigMaps and Services are not watched (no
    need to hold every ConfigMap of the cluster in memory): their names follow from the old
    trainer Job's generation, which is deleted last so a crash half-way repeats the cleanup."""
    stale = []
    for job in _of(children, "Job", naming.COMPONENT_TRAINER):
        old = _generation_of(job)
        if old is None or old == generation:
            continue
        owner = _labels(job).get(naming.LABEL_JOB, "")
        stale += [
            ChildRef("v1", "ConfigMap", naming.config_map_name(owner, old)),
            ChildRef("v1", "Service", naming.rendezvous_service_name(owner, old)),
            ChildRef("batch/v1", "Job", naming.export_job_name(owner, old)),
            ChildRef("batch/v1", "Job", job["metadata"]["name"]),
        ]
    for job in _of(children, "Job", naming.COMPONENT_EXPORTER):
        old = _generation_of(job)
        if old is not None and old != generation:
            stale.append(ChildRef("batch/v1", "Job", job["metadata"]["name"]))
    return list(dict.fromkeys(stale))


def _training_cond(run: RunStatus) -> Cond:
    if run.state is RunState.SUCCEEDED:
        report = run.report or {}
        details = [
            f"{key} {report[key]}" for key in ("steps", "trainLoss", "evalLoss") if key in report
        ]
        message = "training finished" + (f": {', '.join(details)}" if details else "")
        return Cond(T.TRAINED, "True", "Succeeded", message)
    if run.state is RunState.FAILED:
        return Cond(T.TRAINED, "False", run.reason, run.message)
    return Cond(T.TRAINED, "Unknown", run.reason, run.message)


def _export_cond(run: RunStatus | None, serving_enabled: bool) -> Cond:
    if not serving_enabled:
        return Cond(T.EXPORTED, "False", "Disabled", "serving.enabled is false")
    if run is None:
        return Cond(T.EXPORTED, "Unknown", "WaitingForTraining", "export starts after training")
    if run.state is RunState.SUCCEEDED:
        return Cond(T.EXPORTED, "True", "Succeeded", "exported to ONNX")
    if run.state is RunState.FAILED:
        return Cond(T.EXPORTED, "False", run.reason, run.message)
    return Cond(T.EXPORTED, "Unknown", run.reason, run.message)


def _serving_cond(view: ServingView, enabled: bool, endpoint: str) -> Cond:
    if not enabled:
        return Cond(T.SERVING, "False", "Disabled", "serving.enabled is false")
    if not view.exists:
        return Cond(T.SERVING, "Unknown", "NoModel", "no model has passed the gate yet")
    if view.available_replicas > 0 and view.serving_generation is not None:
        rolling = "" if view.rolled_out else f" (rolling out generation {view.template_generation})"
        return Cond(
            T.SERVING,
            "True",
            "Available",
            f"generation {view.serving_generation} serves at {endpoint}, "
            f"{view.available_replicas} ready{rolling}",
        )
    if view.serving_generation is None:
        return Cond(T.SERVING, "Unknown", "Deploying", "waiting for the first inference pod")
    return Cond(T.SERVING, "False", "Unavailable", "no inference pod is ready")


def _ready_cond(
    conds: Mapping[ConditionType, Cond],
    generation: int,
    serving_enabled: bool,
    gate: tuple[bool, str] | None,
    view: ServingView,
) -> Cond:
    validated, trained, exported = conds[T.VALIDATED], conds[T.TRAINED], conds[T.EXPORTED]
    keeps = (
        f"; generation {view.serving_generation} keeps serving"
        if view.serving_generation is not None and view.serving_generation != generation
        else ""
    )
    if validated.status != "True":
        return Cond(T.READY, "False", "ValidationFailed", validated.message + keeps)
    if trained.status == "False":
        return Cond(
            T.READY, "False", "TrainingFailed", f"generation {generation}: {trained.message}{keeps}"
        )
    if trained.status != "True":
        return Cond(T.READY, "False", "Training", trained.message)
    if not serving_enabled:
        return Cond(T.READY, "True", "Trained", f"generation {generation} is trained")
    if exported.status == "False":
        return Cond(
            T.READY, "False", "ExportFailed", f"generation {generation}: {exported.message}{keeps}"
        )
    if exported.status != "True":
        return Cond(T.READY, "False", "Exporting", exported.message)
    if gate is not None and not gate[0]:
        return Cond(T.READY, "False", "GateFailed", f"generation {generation}: {gate[1]}{keeps}")
    if view.serving_generation == generation and view.rolled_out:
        return Cond(T.READY, "True", "Serving", f"generation {generation} is serving")
    return Cond(T.READY, "False", "Deploying", f"rolling out generation {generation}")


def reconcile(obs: Observed, config: OperatorConfig) -> Outcome:
    owner = Owner.from_body(obs.body)
    spec = obs.spec
    spec_generation = int(obs.body["metadata"].get("generation") or 1)
    previous = obs.body.get("status") or {}
    training_hash = builders.training_hash(spec)
    generation = current_generation(obs.children, training_hash, spec_generation)
    outcome = Outcome(delete=_stale_children(obs.children, generation))
    endpoint = naming.endpoint_url(naming.serving_name(owner.name), owner.namespace)
    conds: dict[ConditionType, Cond] = {}

    problems = [f"{item} not found" for item in obs.missing]
    if obs.plan_error:
        problems.append(obs.plan_error)
    training: RunStatus | None = None
    export: RunStatus | None = None
    gate: tuple[bool, str] | None = None
    report: dict[str, Any] | None = None
    view = serving_view(_of(obs.children, "Deployment", naming.COMPONENT_SERVER), previous)

    if problems or obs.plan is None:
        reason = "MissingReference" if obs.missing else "DoesNotFit"
        conds[T.VALIDATED] = Cond(T.VALIDATED, "False", reason, "; ".join(problems))
        conds[T.TRAINED] = Cond(
            T.TRAINED, "Unknown", "NotValidated", "training waits for validation"
        )
    else:
        conds[T.VALIDATED] = Cond(T.VALIDATED, "True", "Valid", obs.plan.reason or "the job fits")
        if not spec.storage.claim_name:
            outcome.apply.append(builders.artifacts_claim(owner, spec, config))
        outcome.apply.append(
            builders.run_config_map(owner, generation, spec, obs.plan, obs.deepspeed)
        )
        outcome.apply.append(builders.rendezvous_service(owner, generation))
        outcome.apply.append(builders.training_job(owner, generation, spec, config, training_hash))
        job_name = naming.training_job_name(owner.name, generation)
        job = _named(_of(obs.children, "Job", naming.COMPONENT_TRAINER), job_name)
        training = run_status(job, _pods_of(obs.children, job_name), "training")
        conds[T.TRAINED] = _training_cond(training)
        report = _report(training, previous, generation)
        if training.state is RunState.SUCCEEDED and spec.serving.enabled:
            outcome.apply.append(builders.export_job(owner, generation, spec, config))
            export_name = naming.export_job_name(owner.name, generation)
            export_job = _named(_of(obs.children, "Job", naming.COMPONENT_EXPORTER), export_name)
            export = run_status(export_job, _pods_of(obs.children, export_name), "export")
        if export is not None and export.state is RunState.SUCCEEDED:
            serving_loss = view.eval_loss if view.template_generation != generation else None
            gate = evaluate_gate(spec.serving.gate, report or {}, _float(serving_loss))

    conds[T.EXPORTED] = _export_cond(export, spec.serving.enabled)
    model_generation, model_loss = view.template_generation, view.eval_loss
    if gate is not None and gate[0]:
        model_generation = generation
        loss = (report or {}).get("evalLoss")
        model_loss = None if loss is None else str(loss)
    if spec.serving.enabled and model_generation is not None:
        outcome.apply.append(
            builders.serving_deployment(owner, model_generation, model_loss, spec, config)
        )
        outcome.apply.append(builders.serving_service(owner))
        if model_generation != view.template_generation:
            view = view.rolling_to(model_generation)
    elif not spec.serving.enabled:
        if _of(obs.children, "Deployment", naming.COMPONENT_SERVER):
            name = naming.serving_name(owner.name)
            outcome.delete += [
                ChildRef("v1", "Service", name),
                ChildRef("apps/v1", "Deployment", name),
            ]
        view = ServingView()
    conds[T.SERVING] = _serving_cond(view, spec.serving.enabled, endpoint)
    conds[T.READY] = _ready_cond(conds, generation, spec.serving.enabled, gate, view)

    merged = merge(previous.get("conditions"), conds.values(), spec_generation, obs.now)
    status = build_status(
        owner=owner,
        spec=spec,
        plan=obs.plan,
        generation=spec_generation,
        training_generation=generation,
        phase=phase(conds),
        conditions=merged,
        training=training,
        report=report,
        gate=gate,
        view=view,
        endpoint=endpoint,
        previous=previous,
    )
    outcome.status_patch = _diff(previous, status)
    outcome.events = transitions(previous.get("conditions"), merged)
    return outcome


def _report(
    training: RunStatus, previous: Mapping[str, Any], generation: int
) -> dict[str, Any] | None:
    """The final report: from the pod while it exists, else what status kept of it."""
    if training.state is not RunState.SUCCEEDED:
        return None
    if training.report is not None:
        return training.report
    evaluation = previous.get("evaluation") or {}
    if evaluation.get("generation") != generation:
        return None
    keys = {"evalLoss": "evalLoss", "baseEvalLoss": "baseEvalLoss", "accuracy": "accuracy"}
    return {k: evaluation[v] for k, v in keys.items() if evaluation.get(v) is not None}


def _float(value: str | None) -> float | None:
    try:
        return None if value is None else float(value)
    except ValueError:
        return None


def _diff(previous: Mapping[str, Any], status: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch that turns `previous` into `status` (top-level keys), or {}."""
    patch = {key: value for key, value in status.items() if previous.get(key) != value}
    return patch
