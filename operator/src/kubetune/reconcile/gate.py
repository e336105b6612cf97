"""The evaluation gate: may a newly trained model replace the one serving now?

One pure function, used by the operator (before it rolls the inference Deployment) and by
`kubetune run` (before it serves locally), so both decide the same way from the same numbers.
"""

from __future__ import annotations

from kubetune.api.dataplane import TrainingReport
from kubetune.api.spec import GateSpec


def evaluate_gate(
    gate: GateSpec | None, report: TrainingReport, serving_eval_loss: float | None
) -> tuple[bool, str]:
    """Check a trainer report (`evalLoss`, `baseEvalLoss`, `accuracy`) against the gate.

    `serving_eval_loss` is the validation loss of the model serving now, or None when nothing
    serves yet (then `mustBeatServing` holds trivially). A bound whose metric was not measured
    fails: a gate the user asked for is never passed silently.
    """
    if gate is None:
        return True, "no gate configured"
    eval_loss, base_loss, accuracy = report.eval_loss, report.base_eval_loss, report.accuracy
    failures: list[str] = []
    checks: list[str] = []

    if gate.max_eval_loss is not None:
        bound = float(gate.max_eval_loss)
        if eval_loss is None:
            failures.append("evalLoss was not measured (no validation data)")
        elif eval_loss > bound:
            failures.append(f"evalLoss {eval_loss:.4f} > maxEvalLoss {bound:g}")
        else:
            checks.append(f"evalLoss {eval_loss:.4f} <= {bound:g}")
    if gate.min_accuracy is not None:
        bound = float(gate.min_accuracy)
        if accuracy is None:
            failures.append("accuracy was not measured (validation records need answers)")
        elif accuracy < bound:
            failures.append(f"accuracy {accuracy:.3f} < minAccuracy {bound:g}")
        else:
            checks.append(f"accuracy {accuracy:.3f} >= {bound:g}")
    if gate.must_beat_base:
        if eval_loss is None or base_loss is None:
            failures.append("evalLoss and baseEvalLoss are needed to compare with the base model")
        elif eval_loss >= base_loss:
            failures.append(f"evalLoss {eval_loss:.4f} does not beat the base {base_loss:.4f}")
        else:
            checks.append(f"evalLoss {eval_loss:.4f} < base {base_loss:.4f}")
    if gate.must_beat_serving and serving_eval_loss is not None:
        if eval_loss is None:
            failures.append("evalLoss is needed to compare with the serving model")
        elif eval_loss >= serving_eval_loss:
            failures.append(
                f"evalLoss {eval_loss:.4f} does not beat the serving model's "
                f"{serving_eval_loss:.4f}"
            )
        else:
            checks.append(f"evalLoss {eval_loss:.4f} < serving {serving_eval_loss:.4f}")

    if failures:
        return False, "gate failed: " + "; ".join(failures)
    return True, "gate passed: " + ("; ".join(checks) if checks else "no bound set")
