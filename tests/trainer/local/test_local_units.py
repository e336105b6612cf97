"""Pure parts of `kubetune run`: commands, progress lines, answer matching, the gate."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from kubetune.api import FineTuneJobSpec, PlanStatus, RunConfig
from kubetune.api.dataplane import (
    AutoChoice,
    CandidateScore,
    ExportReport,
    Score,
    TestSplitScores,
    TrainingReport,
)
from kubetune.api.metrics import Metric, MetricScores, Task, exact_match, score_answers
from kubetune.api.spec import GateSpec
from kubetune.local.evaluate import auto_summary, side_by_side
from kubetune.local.processes import train_command
from kubetune.local.progress import format_progress, loss_curve_points, read_metrics
from kubetune.local.rundir import export_done
from kubetune.local.serve import ENGINE, base_export, still_valid
from kubetune.reconcile.gate import evaluate_gate


def _plan(world_size: int) -> PlanStatus:
    return PlanStatus(world_size=world_size, zero_stage=0, micro_batch_size=1,
                      gradient_accumulation_steps=1, global_batch_size=world_size,
                      estimated_gpu_memory_gib="0")


def test_one_rank_runs_the_trainer_directly() -> None:
    command = train_command(Path("r/run.json"), Path("r"), _plan(1))
    assert command == [sys.executable, "-m", "kubetune_trainer", "train",
                       "--config", "r/run.json", "--output", "r"]


def test_several_ranks_run_under_torchrun_on_one_node() -> None:
    command = train_command(Path("r/run.json"), Path("r"), _plan(3))
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert command[command.index("--nproc_per_node") + 1] == "3"
    assert command[command.index("--nnodes") + 1] == "1"
    assert command[-7:] == ["-m", "kubetune_trainer", "train", "--config", "r/run.json",
                            "--output", "r"]


def test_progress_line_shows_step_loss_and_eta() -> None:
    line = format_progress({"step": 5, "totalSteps": 20, "trainLoss": 1.23456,
                            "etaSeconds": 65})
    assert line.startswith("[######" + "." * 18 + "]")
    assert "step 5/20" in line and "loss 1.2346" in line and "ETA 1m05s" in line
    assert format_progress({"step": 2}, bar=False) == "step 2"


def test_metrics_reader_skips_a_half_written_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "trainLoss": 2.0}) + "\n" + '{"step": 2, "tr')
    assert read_metrics(path) == [{"step": 1, "trainLoss": 2.0}]


def test_loss_curve_keeps_the_newest_value_of_a_repeated_step() -> None:
    records = [{"step": 1, "trainLoss": 3.0}, {"step": 2, "trainLoss": 2.0},
               {"step": 2, "trainLoss": 1.9, "evalLoss": 2.1}]
    assert loss_curve_points(records) == ([(1, 3.0), (2, 1.9)], [(2, 2.1)])


@pytest.mark.parametrize(("answer", "matches"), [
    ("kubectl get pods -n prod", True),
    ("  `kubectl get pods -n prod`\n", True),
    ("```bash\nkubectl get pods -n prod\n```", True),
    ("kubectl get pods  -n prod", True),
    ("kubectl get pods -n production", False),
    ("Sure! kubectl get pods -n prod", False),
])
def test_exact_match_ignores_formatting_only(answer: str, matches: bool) -> None:
    assert exact_match(answer, "kubectl get pods -n prod") is matches


def test_side_by_side_names_both_models() -> None:
    text = side_by_side(Score(accuracy=0.02, correct=2, total=100),
                        Score(accuracy=0.91, correct=91, total=100), "test")
    assert "base model" in text and "2.0%" in text and "91.0%  (91/100)" in text


REPORT = TrainingReport(eval_loss=0.4, base_eval_loss=2.5, accuracy=0.85)


def test_no_gate_passes() -> None:
    assert evaluate_gate(None, Task.GENERATION, REPORT, None) == (True, "no gate configured")


def test_gate_passes_when_every_bound_holds() -> None:
    gate = GateSpec(max_eval_loss="1", min_accuracy="0.8", must_beat_base=True)
    passed, message = evaluate_gate(gate, Task.GENERATION, REPORT, None)
    assert passed, message
    assert "accuracy 0.850 >= 0.8" in message


@pytest.mark.parametrize(("gate", "report", "serving", "reason"), [
    (GateSpec(max_eval_loss="0.3"), REPORT, None, "evalLoss 0.4000 > maxEvalLoss 0.3"),
    (GateSpec(min_accuracy="0.9"), REPORT, None, "accuracy 0.850 < minAccuracy 0.9"),
    (GateSpec(), REPORT.model_copy(update={"base_eval_loss": 0.3}), None,
     "does not beat the base"),
    (GateSpec(must_beat_serving=True), REPORT, MetricScores(values={Metric.EVAL_LOSS: 0.35}),
     "does not beat the serving model"),
    (GateSpec(min_accuracy="0.5"), TrainingReport(eval_loss=1, base_eval_loss=2), None,
     "accuracy was not measured"),
])
def test_gate_fails_with_the_reason(gate: GateSpec, report: TrainingReport,
                                    serving: MetricScores | None, reason: str) -> None:
    passed, message = evaluate_gate(gate, Task.GENERATION, report, serving)
    assert not passed
    assert reason in message


def test_nothing_serving_yet_satisfies_must_beat_serving() -> None:
    assert evaluate_gate(GateSpec(must_beat_serving=True), Task.GENERATION, REPORT, None)[0]


def test_an_auto_export_counts_for_auto_only(tmp_path: Path) -> None:
    """`kubetune run` reuses an export only for what was asked: an INT4 that Auto chose is not
    an INT4 asked for (nor the reverse), so changing the spec re-exports."""
    chosen = ExportReport(ok=True, requested="Auto", precision="INT4", quantization="GPTQ")
    (tmp_path / "export.json").write_text(chosen.to_json())
    assert export_done(tmp_path, "Auto")
    assert not export_done(tmp_path, "INT4-GPTQ") and not export_done(tmp_path, "INT4")
    asked = ExportReport(ok=True, precision="INT4", quantization="GPTQ")
    (tmp_path / "export.json").write_text(asked.to_json())
    assert export_done(tmp_path, "INT4-GPTQ") and not export_done(tmp_path, "Auto")


def test_auto_summary_puts_each_candidate_beside_fp32() -> None:
    choice = AutoChoice(
        rule="exact match at most 0.01 below FP32's", held_out_records=40, answers=40,
        fp32=CandidateScore(precision="FP32", accuracy=0.825, agreement=1.0, loss=0.03),
        candidates=[CandidateScore(precision="INT4", quantization="GPTQ", accuracy=0.85,
                                   agreement=0.97, loss=0.04, passed=True)],
    )
    text = auto_summary(choice, "INT4-GPTQ")
    assert "served INT4-GPTQ" in text and "FP32" in text and " 82.5%" in text
    assert "INT4-GPTQ" in text.splitlines()[-1] and "85.0%" in text and "chosen" in text


def test_auto_summary_shows_the_tasks_metric_the_rule_read() -> None:
    choice = AutoChoice(
        rule="chrF at most 1 below FP32's", held_out_records=40, answers=40,
        fp32=CandidateScore(precision="FP32", accuracy=0.45, agreement=1.0, loss=0.06,
                            task_metric="chrF", task_score=95.18),
        candidates=[CandidateScore(precision="INT4", quantization="GPTQ", accuracy=0.475,
                                   agreement=0.99, loss=0.06, task_metric="chrF",
                                   task_score=95.3, passed=True)],
    )
    text = auto_summary(choice, "INT4-GPTQ")
    assert "chrF 95.180, exact match 45.0%" in text
    assert "chrF 95.300, exact match 47.5%  chosen" in text.splitlines()[-1]


def _quickstart_config(source: str) -> RunConfig:
    spec = FineTuneJobSpec.model_validate({
        "model": {"source": source}, "dataset": {"source": "builtin://kubectl-commands"},
        "resources": {"gpusPerNode": 0},
    })
    return RunConfig(name="demo", spec=spec, plan=_plan(1))


def test_the_base_comparison_of_a_gptq_export_calibrates_on_the_run(tmp_path: Path) -> None:
    """GPTQ needs calibration tokens the base model's directory does not have: the base is
    exported with the run's, into the run directory (not the cache every run shares)."""
    config = _quickstart_config("builtin://smollm2-135m-instruct")
    gptq = ExportReport(ok=True, requested="Auto", precision="INT4", quantization="GPTQ")
    target, command = base_export(config, tmp_path, gptq)
    assert target == tmp_path / "base-onnx"
    assert command[-2:] == ["--calibration-from", str(tmp_path)]
    assert command[command.index("--quantization") + 1] == "GPTQ"
    rtn = ExportReport(ok=True, precision="INT4", quantization="RTN")
    target, command = base_export(config, tmp_path, rtn)
    assert target.name == "smollm2-135m-instruct-int4-cpu" and "--calibration-from" not in command


def test_test_split_scores_without_a_base_are_measured_again() -> None:
    tuned = Score(accuracy=0.85, correct=85, total=100, metrics=MetricScores(
        values={Metric.EXACT_MATCH: 0.85}, records=100))
    scores = TestSplitScores(path="t.jsonl", engine=ENGINE, precision="INT4-GPTQ", base=None,
                             task=Task.GENERATION, fine_tuned=tuned)
    assert still_valid(scores, Path("t.jsonl"), "INT4-GPTQ") is None
    measured = scores.model_copy(update={"base": Score(accuracy=0.0, correct=0, total=100)})
    assert still_valid(measured, Path("t.jsonl"), "INT4-GPTQ") is measured
    assert still_valid(measured, Path("t.jsonl"), "FP32") is None
    # Scores of another task, or from before the task metrics, are measured again.
    assert still_valid(measured, Path("t.jsonl"), "INT4-GPTQ", Task.CLASSIFICATION) is None
    unscored = measured.model_copy(update={"fine_tuned": tuned.model_copy(
        update={"metrics": None})})
    assert still_valid(unscored, Path("t.jsonl"), "INT4-GPTQ") is None


def test_the_test_split_table_puts_every_task_metric_side_by_side() -> None:
    references = ["billing", "tech", "billing", "tech"]
    base_answers = ["billing", "billing", "Hello!", "billing"]
    tuned_answers = ["billing", "tech", "billing", "billing"]

    def score(answers: list[str]) -> Score:
        metrics = score_answers(Task.CLASSIFICATION, answers, references, ["billing", "tech"])
        correct = sum(a == r for a, r in zip(answers, references, strict=True))
        return Score(accuracy=correct / 4, correct=correct, total=4, metrics=metrics)

    text = side_by_side(score(base_answers), score(tuned_answers), "test", Task.CLASSIFICATION)
    rows = {line.split()[0] if not line.startswith("  F1") else " ".join(line.split()[:2]):
            line.split()[-2:] for line in text.splitlines()[4:]}
    assert text.splitlines()[3] == "Classification metrics on the held-out test split (4 " \
                                   "records):"
    # base: billing TP 1 FP 2 FN 1 -> 2/5, tech TP 0 FN 2 -> 0; one answer outside the labels.
    # fine-tuned: billing TP 2 FP 1 -> 4/5, tech TP 1 FN 1 -> 2/3.
    assert rows["accuracy"] == ["0.2500", "0.7500"]
    assert rows["macroF1"] == [f"{(2 / 5 + 0) / 2:.4f}", f"{(4 / 5 + 2 / 3) / 2:.4f}"]
    assert rows["outOfLabels"] == ["0.2500", "0.0000"]
    assert rows["F1 billing"] == ["0.4000", "0.8000"] and rows["F1 tech"] == ["0.0000", "0.6667"]
    assert "exactMatch" not in rows  # the rows above it say the exact match


def test_a_generation_table_is_the_exact_match_alone_and_a_missing_base_says_so() -> None:
    tuned = Score(accuracy=0.5, correct=1, total=2, metrics=score_answers(
        Task.GENERATION, ["a", "b"], ["a", "c"]))
    assert side_by_side(None, tuned, "test").splitlines()[1:] == [
        "  base model        not measured", "  fine-tuned model   50.0%  (1/2)"]
    translated = Score(total=2, metrics=score_answers(Task.TRANSLATION, ["a cat", "b"],
                                                      ["a cat", "c"]))
    text = side_by_side(None, translated, "test", Task.TRANSLATION)
    assert "  chrF" in text and "not measured" in text.splitlines()[5]
    assert "(chrF: nrefs:1|" in text and "(bleu: nrefs:1|" in text


def test_test_split_lines_end_at_newline_only_and_bad_ones_are_named(tmp_path: Path) -> None:
    from kubetune.local.evaluate import load_chat_examples

    def record(user: str, assistant: object) -> str:
        return json.dumps({"messages": [{"role": "user", "content": user},
                                        {"role": "assistant", "content": assistant}]},
                          ensure_ascii=False)

    path = tmp_path / "test.jsonl"
    path.write_text(record("a\u2028b", "x") + "\n" + record("c\u0085d", "y") + "\n",
                    encoding="utf-8")
    assert load_chat_examples(path) == [([{"role": "user", "content": "a\u2028b"}], "x"),
                                        ([{"role": "user", "content": "c\u0085d"}], "y")]
    for bad, problem in [('{"messages": [1]}', "messages[0]"),
                         ('{"messages": [{"role": "user"}]}', "content"),
                         (record("q", 5), "content"),
                         ('{"n": ' + "9" * 4400 + "}", "4300"),
                         ("[]", "object")]:
        path.write_text(record("q", "a") + "\n\n" + bad + "\n", encoding="utf-8")
        with pytest.raises(ValueError) as caught:
            load_chat_examples(path)
        assert str(caught.value).startswith(f"{path}:3: "), bad
        assert problem in str(caught.value), (bad, str(caught.value))
