"""The serving Deployment as reconcile sees it, and the assembly of `status`. Pure."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kubetune.api import FineTuneJobSpec, PlanStatus
from kubetune.api.dataplane import ExportReport, TrainingReport
from kubetune.api.metrics import TASK_METRICS, Metric, MetricScores, Task
from kubetune.api.status import PER_LABEL_F1_LIMIT, STATUS_DEFAULTS, TrainingStatus
from kubetune.builders import naming
from kubetune.builders.meta import Owner
from kubetune.reconcile.children import controller_of
from kubetune.reconcile.gate import base_scores, fine_tuned_scores
from kubetune.reconcile.runs import RunState, RunStatus, serving_trouble


@dataclass(frozen=True)
class ServingView:
    exists: bool = False
    template_generation: int | None = None
    """The model generation in the Deployment's pod template (what it rolls towards)."""
    eval_loss: str | None = None
    """Eval loss of that model (for `mustBeatServing`)."""
    scores: MetricScores | None = None
    """That model's validation metrics (for `mustBeatServing`), its eval loss among them;
    empty for a model whose Deployment recorded none."""
    available_replicas: int = 0
    ready_replicas: int = 0
    rolled_out: bool = False
    """Every replica runs the template's generation and is available."""
    serving_generation: int | None = None
    """The generation answering requests: the template's once rolled out, else the last one
    that was (kept in status across restarts)."""
    trouble: RunStatus | None = None
    """Why the rollout does not complete, as the Deployment and its pods say (the scheduler's
    reason, a crash loop, a passed progress deadline); None while nothing says so."""

    def rolling_to(self, generation: int) -> ServingView:
        """The view once the template changes to `generation`: what the old template's pods
        said of themselves no longer applies."""
        return dataclasses.replace(
            self, exists=True, template_generation=generation, rolled_out=False, trouble=None
        )


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def serving_view(
    deployments: Sequence[Mapping[str, Any]],
    previous: Mapping[str, Any],
    pods: Sequence[Mapping[str, Any]] = (),
) -> ServingView:
    """`pods`: the inference pods (component server); only those a ReplicaSet controls count,
    as only those are the Deployment's."""
    if not deployments:
        return ServingView()
    deployment = deployments[0]
    meta = deployment.get("metadata") or {}
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    template = ((spec.get("template") or {}).get("metadata") or {}).get("annotations") or {}
    template_generation = _int(template.get(naming.ANNOTATION_MODEL_GENERATION))
    wanted = int(spec.get("replicas", 1))
    available = int(status.get("availableReplicas") or 0)
    rolled_out = (
        int(status.get("observedGeneration") or 0) >= int(meta.get("generation") or 0)
        and int(status.get("updatedReplicas") or 0) >= wanted
        and int(status.get("replicas") or 0) == wanted
        and available >= wanted
    )
    before = _int((previous.get("serving") or {}).get("modelGeneration"))
    annotations = meta.get("annotations") or {}
    eval_loss = annotations.get(naming.ANNOTATION_MODEL_EVAL_LOSS)
    return ServingView(
        exists=True,
        template_generation=template_generation,
        eval_loss=eval_loss,
        scores=served_scores(annotations.get(naming.ANNOTATION_MODEL_METRICS), eval_loss),
        available_replicas=available,
        ready_replicas=int(status.get("readyReplicas") or 0),
        rolled_out=rolled_out,
        serving_generation=template_generation if rolled_out else before,
        trouble=None if rolled_out else serving_trouble(deployment, _replica_pods(pods)),
    )


def served_scores(metrics: Any, eval_loss: Any) -> MetricScores:
    """The served model's metrics from the Deployment's annotations (or, in a pool, the set's
    entry: a mapping already): the metrics annotation (unknown names, which a newer operator
    may write, and non-numbers skipped), completed by the eval-loss one that Deployments
    rolled before metrics existed carry alone."""
    values: dict[Metric, float] = {}
    try:
        recorded = json.loads(metrics) if isinstance(metrics, str) else metrics
    except ValueError:
        recorded = {}
    for name, value in (recorded.items() if isinstance(recorded, dict) else ()):
        number = _finite(value)
        if name in {metric.value for metric in Metric} and number is not None:
            values[Metric(name)] = number
    loss = _finite(eval_loss)
    if loss is not None:
        values.setdefault(Metric.EVAL_LOSS, loss)
    return MetricScores(values=values)


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _replica_pods(pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    def controller(pod: Mapping[str, Any]) -> tuple[Any, Any]:
        ref = controller_of(pod) or {}
        return ref.get("apiVersion"), ref.get("kind")

    return [pod for pod in pods if controller(pod) == ("apps/v1", "ReplicaSet")]


def decimal(value: Any) -> str | None:
    """Numbers in status are decimal strings (API conventions: no floats)."""
    if value is None:
        return None
    try:
        return format(float(value), ".6g")
    except (TypeError, ValueError):
        return None


def _progress(training: RunStatus | None, generation: int, previous: Mapping[str, Any]) -> Any:
    """None clears progress (a new generation starts); a dict sets it, from the succeeded
    trainer pod's final report; `...` leaves it as it is: to the progress endpoint, which
    patches it while training runs, and, once the pod is gone, as the final report set it.
    Progress of another training `generation` is cleared: the pass that creates a new
    generation's Job sees it Pending, and the old progress says nothing of it."""
    if training is None or training.state is RunState.MISSING:
        return None
    report = training.report
    if training.state is RunState.SUCCEEDED and report:
        steps = report.steps or None
        progress = {
            "generation": generation,
            "step": report.steps,
            "totalSteps": steps,
            "percent": 100,
            "trainLoss": decimal(report.train_loss),
            "evalLoss": decimal(report.eval_loss),
            "tokensPerSecond": decimal(report.tokens_per_second),
            "etaSeconds": 0,
        }
        return {k: v for k, v in progress.items() if v is not None}
    if not of_generation(previous.get("progress"), generation):
        return None
    return ...


def recorded_training(previous: Mapping[str, Any]) -> TrainingStatus | None:
    """The training generation `status.training` records, or None when there is none (a
    FineTuneJob an older operator started) or it does not parse (edited by hand)."""
    try:
        return TrainingStatus.model_validate(previous.get("training"))
    except ValidationError:
        return None


def of_generation(progress: Any, generation: int) -> bool:
    """Whether `status.progress` may be of training `generation`: it says so, or it names no
    generation (written by an operator before progress named one)."""
    if not isinstance(progress, Mapping):
        return False
    return progress.get("generation") in (None, generation)


def _artifacts(
    owner: Owner, spec: FineTuneJobSpec, generation: int, trained: bool, exported: bool
) -> dict[str, Any]:
    run = naming.run_path(owner.name, generation)
    artifacts: dict[str, Any] = {
        "volume": spec.storage.claim_name or naming.artifacts_claim_name(owner.name)
    }
    if trained:
        if spec.method.uses_adapter:
            artifacts["adapter"] = f"{run}/adapter"
        artifacts["merged"] = f"{run}/merged"
    if exported:
        artifacts["onnx"] = f"{run}/onnx"
    return artifacts


def _exported(exported: ExportReport | None, previous: Mapping[str, Any],
              generation: int) -> dict[str, Any]:
    """The export's keys of `status.evaluation`: from the export pod's report, else kept from
    the previous status of the same generation (the pod may be gone)."""
    if exported is None:
        kept = previous.get("evaluation") or {}
        if kept.get("generation") != generation:
            return {}
        names = ("exportedWeights", "exportedAccuracy", "exportMessage")
        return {name: kept[name] for name in names if kept.get(name)}
    keys: dict[str, Any] = {"exportedWeights": exported.weights}
    auto = exported.auto
    if auto is not None:
        chosen = next((c for c in auto.candidates if c.passed), auto.fp32)
        keys["exportedAccuracy"] = decimal(chosen.accuracy)
        keys["exportMessage"] = exported.choice_message()
    return {name: value for name, value in keys.items() if value is not None}


def metrics_status(
    task: Task, report: TrainingReport, serving: MetricScores | None
) -> list[dict[str, Any]]:
    """`status.evaluation.metrics`: each of the task's metrics that a model was measured on,
    in the task's order, base, fine-tuned and (while another generation serves) the serving
    model's value side by side."""
    fine_tuned, base = fine_tuned_scores(report), base_scores(report)
    served = serving.values if serving is not None else {}
    rows = []
    for metric in TASK_METRICS[task]:
        row = {"name": metric.value, "base": decimal(base.get(metric)),
               "fineTuned": decimal(fine_tuned.get(metric)),
               "serving": decimal(served.get(metric))}
        if row["base"] is not None or row["fineTuned"] is not None:
            rows.append({key: value for key, value in row.items() if value is not None})
    return rows


def per_label_f1_status(report: TrainingReport) -> list[dict[str, Any]] | None:
    """`status.evaluation.perLabelF1`: each label's F1, base and fine-tuned; None when there
    is none or more labels than status keeps."""
    fine_tuned = report.metrics.per_label_f1 if report.metrics is not None else {}
    base = report.base_metrics.per_label_f1 if report.base_metrics is not None else {}
    labels = list(fine_tuned) + [label for label in base if label not in fine_tuned]
    if not labels or len(labels) > PER_LABEL_F1_LIMIT:
        return None
    rows = [{"label": label, "base": decimal(base.get(label)),
             "fineTuned": decimal(fine_tuned.get(label))} for label in labels]
    return [{key: value for key, value in row.items() if value is not None} for row in rows]


def _evaluation(
    generation: int, task: Task, report: TrainingReport | None,
    gate: tuple[bool, str] | None, exported: dict[str, Any], serving: MetricScores | None,
) -> dict[str, Any] | None:
    if report is None:
        return None
    evaluation: dict[str, Any] = {"generation": generation, "task": task.value, **exported}
    measured = {"evalLoss": report.eval_loss, "baseEvalLoss": report.base_eval_loss,
                "accuracy": report.accuracy, "baseAccuracy": report.base_accuracy}
    for key, number in measured.items():
        value = decimal(number)
        if value is not None:
            evaluation[key] = value
    metrics = metrics_status(task, report, serving)
    if metrics:
        evaluation["metrics"] = metrics
    per_label = per_label_f1_status(report)
    if per_label:
        evaluation["perLabelF1"] = per_label
    if gate is not None:
        evaluation["passed"], evaluation["message"] = gate
    return evaluation


def build_status(
    *,
    owner: Owner,
    spec: FineTuneJobSpec,
    plan: PlanStatus | None,
    generation: int,
    training_generation: int,
    training_record: TrainingStatus | None,
    serving_enabled: bool,
    phase: str,
    conditions: list[dict[str, Any]],
    training: RunStatus | None,
    report: TrainingReport | None,
    export_result: ExportReport | None,
    gate: tuple[bool, str] | None,
    view: ServingView,
    endpoint: str,
    previous: Mapping[str, Any],
    compared_scores: MetricScores | None = None,
    pool: str | None = None,
    not_shared_reason: str | None = None,
) -> dict[str, Any]:
    """The status keys reconcile owns, each exactly as this pass observed it (a key missing
    here is left as it is; a None is removed). Within a key nothing is kept from before but
    what this training generation measured: `status_patch` removes the rest.
    `training_record` None leaves `status.training` as it is. `serving_enabled`: whether a
    Deployment is wanted or, with an invalid spec, left running. `compared_scores`: the
    metrics of the model serving now, when it is another generation (what
    `mustBeatServing` compares with). `pool`: the pool serving this job (its Deployment and
    Service are the pool's); `not_shared_reason`: why a job naming a pool is served on its
    own, or why the pool refused its adapter."""
    trained = training is not None and training.state is RunState.SUCCEEDED
    exported = any(c["type"] == "Exported" and c["status"] == "True" for c in conditions)
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "phase": str(phase),
        "conditions": conditions,
        "plan": plan.to_wire() if plan is not None else None,
        # A pool member's model is its adapter: no ONNX export of its own.
        "artifacts": _artifacts(owner, spec, training_generation, trained,
                                exported and pool is None),
    }
    if training_record is not None:
        status["training"] = training_record.to_wire()
    progress = _progress(training, training_generation, previous)
    if progress is not ...:
        status["progress"] = progress
    evaluation = _evaluation(training_generation, spec.evaluation.task, report, gate,
                             _exported(export_result, previous, training_generation),
                             compared_scores)
    if evaluation is not None:
        status["evaluation"] = evaluation
    elif (previous.get("evaluation") or {}).get("generation") != training_generation:
        # An earlier generation's numbers: they say nothing of this one, and a report
        # rebuilt from status must not find them.
        status["evaluation"] = None
    if not serving_enabled or (not view.exists and not_shared_reason is None and pool is None):
        status["serving"] = None
    else:
        name = naming.serving_name(owner.name) if pool is None else naming.pool_server_name(pool)
        serving = {
            "deployment": name if view.exists else None,
            "service": name if view.exists else None,
            "endpoint": endpoint if view.exists else None,
            "model": naming.served_model_name(owner.name),
            "modelGeneration": view.serving_generation,
            "readyReplicas": view.ready_replicas if view.exists else None,
            "pool": pool,
            "notSharedReason": not_shared_reason,
        }
        status["serving"] = {k: v for k, v in serving.items() if v is not None}
    return status


def status_patch(
    previous: Mapping[str, Any],
    status: Mapping[str, Any],
    defaults: Mapping[str, Any] = STATUS_DEFAULTS,
) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that makes each key of `status` exactly so, or {}.

    A merge patch merges objects key by key, at every depth, so a nested key that `status`
    no longer has (an earlier generation's `accuracy`, the progress endpoint's `updateTime`)
    would stay for ever unless the patch sets it to null. Top-level keys `status` leaves out
    are not reconcile's to write (`progress` while training runs) and stay as they are.

    A key the CRD gives a default (`defaults`: `evaluation.message` is "") reads back as that
    default when removed, so holding it is the same as not having it: nulling it would be
    undone at once and sent again on every pass, for ever."""
    patch: dict[str, Any] = {}
    for key, wanted in status.items():
        now = previous.get(key)
        default = defaults.get(key)
        if wanted is None:
            if now is not None and not _is_default(now, default):
                patch[key] = None
        elif isinstance(wanted, Mapping) and isinstance(now, Mapping):
            nested = _exactly(now, wanted, default if isinstance(default, Mapping) else {})
            if nested:
                patch[key] = nested
        elif now != wanted:
            patch[key] = wanted
    return patch


def _is_default(value: Any, default: Any) -> bool:
    return default is not None and not isinstance(default, Mapping) and value == default


def _exactly(
    now: Mapping[str, Any], wanted: Mapping[str, Any], defaults: Mapping[str, Any]
) -> dict[str, Any]:
    """The merge patch that turns the object `now` into `wanted`: its keys that `wanted`
    does not have are set to null (unless they hold the default the server fills in)."""
    patch = status_patch(now, wanted, defaults)
    patch.update({key: None for key, value in now.items()
                  if key not in wanted and value is not None
                  and not _is_default(value, defaults.get(key))})  # fmt: skip
    return patch
