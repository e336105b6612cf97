"""The FineTuneJob's conditions from what reconcile found: Trained, Exported, Serving, Ready.

Pure functions of the run states, the serving view and the gate. They live apart from
`kubetune.reconcile.decide` because they only phrase status (reason and message per state), while
reconcile decides what to create and delete; the wording changes without touching that logic.
"""

from __future__ import annotations

from collections.abc import Mapping

from kubetune.api import ConditionType
from kubetune.api.dataplane import TrainingReport
from kubetune.reconcile.conditions import Cond
from kubetune.reconcile.refusals import REASON as REFUSED
from kubetune.reconcile.runs import RunState, RunStatus
from kubetune.reconcile.status import ServingView

T = ConditionType


def training_condition(run: RunStatus, report: TrainingReport | None = None) -> Cond:
    """`report`: the final report when the pod that wrote it is gone (rebuilt from status)."""
    if run.state is RunState.SUCCEEDED:
        report = run.report or report or TrainingReport()
        measured = {"steps": report.steps, "trainLoss": report.train_loss,
                    "evalLoss": report.eval_loss}
        details = [f"{key} {value}" for key, value in measured.items() if value is not None]
        message = "training finished" + (f": {', '.join(details)}" if details else "")
        if report.plan_mismatch:
            message += f"; {report.plan_mismatch}"
        return Cond(T.TRAINED, "True", "Succeeded", message)
    if run.state is RunState.FAILED:
        return Cond(T.TRAINED, "False", run.reason, run.message)
    return Cond(T.TRAINED, "Unknown", run.reason, run.message)


def export_condition(run: RunStatus | None, serving_enabled: bool) -> Cond:
    if not serving_enabled:
        return Cond(T.EXPORTED, "False", "Disabled", "serving.enabled is false")
    if run is None:
        return Cond(T.EXPORTED, "Unknown", "WaitingForTraining", "export starts after training")
    if run.state is RunState.SUCCEEDED:
        return Cond(T.EXPORTED, "True", "Succeeded", "exported to ONNX")
    if run.state is RunState.FAILED:
        return Cond(T.EXPORTED, "False", run.reason, run.message)
    return Cond(T.EXPORTED, "Unknown", run.reason, run.message)


def serving_condition(view: ServingView, enabled: bool, endpoint: str) -> Cond:
    if not enabled:
        return Cond(T.SERVING, "False", "Disabled", "serving.enabled is false")
    if not view.exists:
        return Cond(T.SERVING, "Unknown", "NoModel", "no model has passed the gate yet")
    trouble = view.trouble
    if view.available_replicas > 0 and view.serving_generation is not None:
        rolling = ""
        if not view.rolled_out:
            why = f": {trouble.message}" if trouble else ""
            rolling = f" (rolling out generation {view.template_generation}{why})"
        return Cond(
            T.SERVING,
            "True",
            "Available",
            f"generation {view.serving_generation} serves at {endpoint}, "
            f"{view.available_replicas} ready{rolling}",
        )
    if view.serving_generation is None:
        if trouble is not None:
            # Stuck before the first pod: the scheduler's, kubelet's or Deployment's reason.
            if trouble.state is RunState.FAILED:
                return Cond(T.SERVING, "False", trouble.reason, trouble.message)
            return Cond(T.SERVING, "Unknown", trouble.reason, trouble.message)
        return Cond(T.SERVING, "Unknown", "Deploying", "waiting for the first inference pod")
    if trouble is not None:
        message = f"no inference pod is ready: {trouble.message}"
        return Cond(T.SERVING, "False", trouble.reason, message)
    return Cond(T.SERVING, "False", "Unavailable", "no inference pod is ready")



def ready_condition(
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
    serving = conds.get(T.SERVING)
    if serving is not None and serving.status == "False" and serving.reason == REFUSED:
        message = f"generation {generation}: {serving.message}"
        return Cond(T.READY, "False", "ServingFailed", message)
    if view.trouble is not None and view.trouble.state is RunState.FAILED:
        # The Deployment controller gave up on the rollout until the template changes.
        message = f"generation {generation}: {view.trouble.message}{keeps}"
        return Cond(T.READY, "False", "ServingFailed", message)
    if view.serving_generation == generation and view.rolled_out:
        return Cond(T.READY, "True", "Serving", f"generation {generation} is serving")
    why = f": {view.trouble.message}" if view.trouble is not None else ""
    return Cond(T.READY, "False", "Deploying", f"rolling out generation {generation}{why}")
