"""Gates on task metrics against the real control plane: a Classification job gated on
macroF1 and a Translation job gated on chrF. Each trains generation 1 (kwok pods whose
termination messages are the trainer's short report), then a worse generation 2 that the
gate blocks while generation 1 keeps serving. No mocks."""

from __future__ import annotations

import json
from typing import Any

from cluster import Cluster

from .operator_harness import condition, finetunejob, has_condition, pod_metadata, succeed, wait_ftj

CLASSIFICATION = {"task": "Classification", "labels": ["billing", "access", "outage", "other"]}


def _report(task: str, values: dict[str, float], base: dict[str, float]) -> dict[str, Any]:
    """A trainer's short report with task metrics, as `kubetune_trainer` writes it."""
    return {
        "status": "Succeeded", "steps": 20, "trainLoss": 1.2, "evalLoss": 1.0,
        "baseEvalLoss": 1.9, "task": task,
        "metrics": {"values": {**values, "evalLoss": 1.0}, "records": 40},
        "baseMetrics": {"values": {**base, "evalLoss": 1.9}, "records": 40},
    }  # fmt: skip


def _row(obj: dict[str, Any], name: str) -> dict[str, Any]:
    return next(row for row in obj["status"]["evaluation"]["metrics"] if row["name"] == name)


def _train_generation_2(cluster: Cluster, ns: str, name: str, report: dict[str, Any]) -> None:
    patch = {
        "metadata": {"annotations": {"kubetune.io/pod-metadata": pod_metadata(
            train=succeed("1s", report), export=succeed("1s"))}},
        "spec": {"training": {"epochs": 2}},
    }  # fmt: skip
    cluster.kubectl("patch", "ftj", name, "-n", ns, "--type=merge", "-p", json.dumps(patch))


def _generation_1_keeps_serving(cluster: Cluster, ns: str, name: str,
                                failed: dict[str, Any]) -> None:
    assert failed["status"]["evaluation"]["generation"] == 2
    assert failed["status"]["evaluation"]["passed"] is False
    assert failed["status"]["serving"]["modelGeneration"] == 1
    assert condition(failed, "Serving")["status"] == "True"
    deployment = cluster.get("deployment", f"{name}-server", ns)
    assert deployment is not None
    assert deployment["spec"]["template"]["metadata"]["annotations"][
        "kubetune.io/model-generation"] == "1"  # fmt: skip


def test_a_gate_on_macro_f1_blocks_a_worse_classifier(cluster: Cluster, ns: str) -> None:
    first = _report("Classification", {"accuracy": 0.8, "macroF1": 0.74, "outOfLabels": 0.02},
                    {"accuracy": 0.3, "macroF1": 0.22, "outOfLabels": 0.35})
    gate = {"min": {"macroF1": "0.6"}, "max": {"outOfLabels": "0.1"}}
    cluster.apply(finetunejob("classify", ns, train=succeed("2s", first),
                              evaluation=CLASSIFICATION, serving={"gate": gate}))
    ready = wait_ftj(cluster, ns, "classify", has_condition("Ready"))
    assert _row(ready, "macroF1") == {"name": "macroF1", "base": "0.22", "fineTuned": "0.74"}
    assert "macroF1 0.74 >= 0.6" in ready["status"]["evaluation"]["message"]

    worse = _report("Classification", {"accuracy": 0.6, "macroF1": 0.41, "outOfLabels": 0.04},
                    {"accuracy": 0.3, "macroF1": 0.22, "outOfLabels": 0.35})
    _train_generation_2(cluster, ns, "classify", worse)

    failed = wait_ftj(cluster, ns, "classify", has_condition("Ready", "False", "GateFailed"))
    message = condition(failed, "Ready")["message"]
    assert "macroF1 0.41 < min 0.6" in message and "generation 1 keeps serving" in message
    assert _row(failed, "macroF1")["fineTuned"] == "0.41"
    _generation_1_keeps_serving(cluster, ns, "classify", failed)


def test_a_gate_on_chrf_blocks_a_translator_that_does_not_beat_the_serving_one(
    cluster: Cluster, ns: str
) -> None:
    """Generation 2 clears the chrF bound and beats the base, but not generation 1's chrF,
    which the operator kept on generation 1's Deployment."""
    base = {"chrF": 31.5, "bleu": 9.2}
    first = _report("Translation", {"chrF": 57.25, "bleu": 30.1}, base)
    gate = {"min": {"chrF": "50"}, "mustBeatServing": True}
    cluster.apply(finetunejob("translate", ns, train=succeed("2s", first),
                              evaluation={"task": "Translation"}, serving={"gate": gate}))
    ready = wait_ftj(cluster, ns, "translate", has_condition("Ready"))
    assert "chrF 57.25 beats the base 31.5" in ready["status"]["evaluation"]["message"]

    _train_generation_2(cluster, ns, "translate",
                        _report("Translation", {"chrF": 53.0, "bleu": 33.4}, base))

    failed = wait_ftj(cluster, ns, "translate", has_condition("Ready", "False", "GateFailed"))
    message = condition(failed, "Ready")["message"]
    assert "chrF 53 does not beat the serving model's 57.25" in message, message
    assert "generation 1 keeps serving" in message
    assert _row(failed, "chrF") == {"name": "chrF", "base": "31.5", "fineTuned": "53",
                                    "serving": "57.25"}
    _generation_1_keeps_serving(cluster, ns, "translate", failed)
