"""The trainer judges a run by `spec.evaluation`'s task metrics, base vs fine-tuned, and writes
`evaluation.jsonl` record by record, the records that regressed most first."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.dataplane import TrainingReport
from kubetune.api.metrics import Metric, Task
from kubetune.api.spec import EvaluationSpec, JudgeSpec
from kubetune_trainer.judge import Comparison, ItemVerdict, Verdict, outcome, tally
from kubetune_trainer.train import evaluate
from kubetune_trainer.train.data import Example
from kubetune_trainer.train.loop import CRASH_ENV
from tests.trainer.conftest import run_config, start_training, succeeded

LABELS = ["billing", "tech"]
SYSTEM = "Route the support ticket: answer billing or tech."
TRAIN = [
    ("I was charged twice this month", "billing"),
    ("The app crashes when I log in", "tech"),
    ("Please refund my last invoice", "billing"),
    ("The page shows error 500", "tech"),
    ("My card was declined at checkout", "billing"),
    ("I cannot reset my password", "tech"),
]
VALIDATION = [
    ("Why is my invoice higher than usual", "billing"),
    ("The upload button does nothing", "tech"),
    ("I want my money back", "billing"),
    ("The app freezes on start", "tech"),
]


def ticket(question: str, label: str) -> str:
    return json.dumps({"messages": [{"role": "system", "content": SYSTEM},
                                    {"role": "user", "content": question},
                                    {"role": "assistant", "content": label}]})


def chat(question: str, answer: str, line: int) -> Example:
    return Example(line, messages=(("user", question), ("assistant", answer)))


def test_records_that_regressed_most_come_first() -> None:
    spec = EvaluationSpec(task=Task.CLASSIFICATION, labels=LABELS)
    examples = [chat(q, a, i + 1) for i, (q, a) in enumerate(VALIDATION)]
    # base right on 1, 3, 4; fine-tuned right on 1, 2 (a gain), 4; wrong on 3 (a regression).
    before = evaluate.Evaluation(answers=["billing", "billing", "billing", "tech"], loss=2.0)
    after = evaluate.Evaluation(answers=["billing", "tech", "no idea", "tech"], loss=1.0)
    lines = evaluate.record_lines(spec, examples, before, after)
    assert [line["line"] for line in lines] == [3, 1, 4, 2]  # regressed, unchanged x2, gained
    assert lines[0] == {
        "line": 3, "input": "I want my money back", "expected": "billing",
        "baseAnswer": "billing", "fineTunedAnswer": "no idea",
        "base": {Metric.ACCURACY: 1.0, Metric.OUT_OF_LABELS: 0.0},
        "fineTuned": {Metric.ACCURACY: 0.0, Metric.OUT_OF_LABELS: 1.0},
    }
    scores = evaluate.task_scores(spec, after, examples)
    assert scores.values == pytest.approx({
        Metric.ACCURACY: 3 / 4, Metric.OUT_OF_LABELS: 1 / 4, Metric.EVAL_LOSS: 1.0,
        Metric.PERPLEXITY: math.e,
        # billing: TP 1, FN 1 -> 2/3; tech: TP 2 -> 1.
        Metric.MACRO_F1: (2 / 3 + 1) / 2})


def test_a_lower_is_better_ranking_and_chosen_metrics() -> None:
    assert evaluate.regression(Metric.EVAL_LOSS, 1.0, 1.5) == 0.5
    assert evaluate.regression(Metric.CHRF, 60.0, 40.0) == 20.0
    spec = EvaluationSpec(task=Task.TRANSLATION, metrics=[Metric.CHRF])
    examples = [chat("hallo welt", "hello world", 1), chat("guten tag", "good day", 2)]
    before = evaluate.Evaluation(answers=["hello", "good day"])
    after = evaluate.Evaluation(answers=["hello world", "bad day"])
    lines = evaluate.record_lines(spec, examples, before, after)
    assert [line["line"] for line in lines] == [2, 1]  # ranked by chrF; BLEU not chosen
    assert set(lines[0]["base"]) == {Metric.CHRF}
    assert set(evaluate.task_scores(spec, after, examples).values) == {Metric.CHRF}


def test_a_classifier_judged_by_macro_f1_alone_still_ranks_its_records() -> None:
    spec = EvaluationSpec(task=Task.CLASSIFICATION, labels=LABELS, metrics=[Metric.MACRO_F1])
    examples = [chat(q, a, i + 1) for i, (q, a) in enumerate(VALIDATION)]
    before = evaluate.Evaluation(answers=["tech", "tech", "billing", "tech"])
    after = evaluate.Evaluation(answers=["billing", "tech", "tech", "tech"])
    lines = evaluate.record_lines(spec, examples, before, after)
    assert [line["line"] for line in lines] == [3, 2, 4, 1]  # accuracy stands for macro-F1
    assert lines[0]["base"] == {Metric.ACCURACY: 1.0}
    assert set(evaluate.task_scores(spec, after, examples).values) == {Metric.MACRO_F1}


def _evaluation_lines(output: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output / "evaluation.jsonl").read_text().splitlines()]


def test_a_classification_run_reports_its_metrics_and_a_resumed_one_reuses_the_base(
        tmp_path: Path, builtin_model: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    train, validation = data / "train.jsonl", data / "validation.jsonl"
    train.write_text("".join(ticket(q, a) + "\n" for q, a in TRAIN))
    validation.write_text("".join(ticket(q, a) + "\n" for q, a in VALIDATION))
    config = run_config(train, validation, steps=2)
    config["spec"]["checkpoint"] = {"everySteps": 1, "keep": 1}
    config["spec"]["evaluation"] = {"task": "Classification", "labels": LABELS}
    output = tmp_path / "out"
    env = {"KUBETUNE_EVAL_MAX_RECORDS": "4"}
    crashed = start_training(config, output, env={**env, CRASH_ENV: "1"})
    assert crashed.returncode == 3, crashed.stderr[-2000:]

    # The first attempt's base answers, replaced: only reading them back can report these.
    saved_path = output / evaluate.BASE_EVALUATION
    saved = json.loads(saved_path.read_text())
    assert len(saved["evaluation"]["answers"]) == 4
    saved["evaluation"]["answers"] = ["no idea", "perhaps", "billing", "tech"]
    saved_path.write_text(json.dumps(saved))
    succeeded(start_training(config, output, env=env))

    report = TrainingReport.read(output / "report.json")
    assert report.resumed_from_step == 1 and report.task is Task.CLASSIFICATION
    assert report.base_metrics is not None and report.metrics is not None
    # Base: right on 3 and 4, outside the labels on 1 and 2; billing and tech each TP 1, FN 1.
    assert report.base_metrics.values[Metric.ACCURACY] == 0.5
    assert report.base_metrics.values[Metric.OUT_OF_LABELS] == 0.5
    assert report.base_metrics.per_label_f1 == pytest.approx({"billing": 2 / 3, "tech": 2 / 3})
    assert report.base_metrics.values[Metric.MACRO_F1] == pytest.approx(2 / 3)
    assert set(report.metrics.values) == {Metric.ACCURACY, Metric.MACRO_F1, Metric.OUT_OF_LABELS,
                                          Metric.EVAL_LOSS, Metric.PERPLEXITY}
    assert report.metrics.values[Metric.EVAL_LOSS] == report.eval_loss
    assert report.metrics.values[Metric.ACCURACY] == report.accuracy
    assert report.metrics.records == 4

    lines = _evaluation_lines(output)
    assert [line["baseAnswer"] for line in sorted(lines, key=lambda line: line["line"])] == [
        "no idea", "perhaps", "billing", "tech"]
    assert [line["expected"] for line in sorted(lines, key=lambda line: line["line"])] == [
        label for _, label in VALIDATION]
    tuned = [line["fineTuned"]["accuracy"] for line in lines]
    assert sum(tuned) / 4 == report.metrics.values[Metric.ACCURACY]
    regressions = [line["base"]["accuracy"] - line["fineTuned"]["accuracy"] for line in lines]
    assert regressions == sorted(regressions, reverse=True)


def test_chat_has_no_per_record_metric_so_records_keep_dataset_order() -> None:
    spec = EvaluationSpec(task=Task.CHAT)
    examples = [chat("hi", "hello there", 1), chat("bye", "goodbye", 2)]
    before = evaluate.Evaluation(answers=["hello there", "goodbye"], loss=math.log(9))
    after = evaluate.Evaluation(answers=["hey", "see you"], loss=math.log(3))
    lines = evaluate.record_lines(spec, examples, before, after)
    assert [(line["line"], line["base"], line["fineTuned"]) for line in lines] == [
        (1, {}, {}), (2, {}, {})]
    assert evaluate.task_scores(spec, after, examples).values == pytest.approx({
        Metric.EVAL_LOSS: math.log(3), Metric.PERPLEXITY: 3.0})


def test_extraction_records_rank_by_token_f1() -> None:
    spec = EvaluationSpec(task=Task.EXTRACTION)
    examples = [chat("who?", '{"name": "Ada"}', 1), chat("where?", '{"city": "Paris"}', 2)]
    before = evaluate.Evaluation(answers=['{"name": "Ada"}', '{"city": "Rome"}'])
    after = evaluate.Evaluation(answers=['{"name": "Bob"}', '{"city": "Paris"}'])
    lines = evaluate.record_lines(spec, examples, before, after)
    assert [line["line"] for line in lines] == [1, 2]
    assert lines[0]["fineTuned"][Metric.FIELD_PRECISION] == 0.0
    assert lines[1]["fineTuned"][Metric.FIELD_RECALL] == 1.0
    before_lines = evaluate.record_lines(spec, examples, after, before)  # roles swapped
    assert [line["line"] for line in before_lines] == [2, 1]


def _comparison(shown_as: Verdict, verdict: Verdict) -> Comparison:
    return Comparison(fine_tuned_shown_as=shown_as, reply=f"[[{verdict.value}]]",
                      verdict=verdict, outcome=outcome(verdict, shown_as))


def test_the_judge_is_asked_only_for_a_chat_run_that_reports_its_win_rate() -> None:
    judge = JudgeSpec(endpoint="http://judge:8000/v1", model="judge")
    assert evaluate.judged(EvaluationSpec(task=Task.CHAT, judge=judge))
    assert evaluate.judged(EvaluationSpec(task=Task.CHAT, judge=judge,
                                          metrics=[Metric.EVAL_LOSS, Metric.JUDGE_WIN_RATE]))
    assert not evaluate.judged(EvaluationSpec(task=Task.CHAT))
    # Admission refuses a judge whose win rate the run would leave out: it is never set idle.
    with pytest.raises(ValueError, match=r"evaluation\.judge applies only to task Chat"):
        EvaluationSpec(task=Task.CHAT, judge=judge, metrics=[Metric.EVAL_LOSS])
    with pytest.raises(ValueError, match=r"evaluation\.judge applies only to task Chat"):
        EvaluationSpec(task=Task.SUMMARIZATION, judge=judge)


def test_the_judge_sees_the_conversation_and_both_answers_of_each_answered_record() -> None:
    follow_up = Example(7, messages=(("system", "Be brief."), ("user", "Name a port."),
                                     ("assistant", "8080"), ("user", "Another?"),
                                     ("assistant", "443")))
    examples = [chat("hi", "hello there", 1), follow_up]
    before = evaluate.Evaluation(answers=["hello", "22"])
    after = evaluate.Evaluation(answers=["hello there", "443"])
    items = evaluate.judge_items(examples, before, after)
    assert [(i.prompt, i.base_answer, i.fine_tuned_answer) for i in items] == [
        ("hi", "hello", "hello there"),
        ("system: Be brief.\n\nuser: Name a port.\n\nassistant: 8080\n\nuser: Another?",
         "22", "443"),
    ]
    # Without both models' answers there is nothing to compare (not a record of ties).
    assert evaluate.judge_items(examples, evaluate.Evaluation(), after) == []


def test_chat_records_carry_the_judges_verdicts_the_least_liked_first() -> None:
    spec = EvaluationSpec(task=Task.CHAT, judge=JudgeSpec(endpoint="http://judge/v1", model="j"))
    examples = [chat("hi", "hello there", 1), chat("bye", "goodbye", 2), chat("why", "because", 3)]
    before = evaluate.Evaluation(answers=["hello", "bye", "dunno"])
    after = evaluate.Evaluation(answers=["hello there", "see you", "because"])
    # Record 1: won both orders; record 2: lost both; record 3: won one, an unparsed reply.
    verdicts = tally([
        ItemVerdict(index=0, score=1.0, comparisons=[_comparison(Verdict.B, Verdict.B),
                                                     _comparison(Verdict.A, Verdict.A)]),
        ItemVerdict(index=1, score=0.0, comparisons=[_comparison(Verdict.B, Verdict.A),
                                                     _comparison(Verdict.A, Verdict.B)]),
        ItemVerdict(index=2, score=0.75, comparisons=[_comparison(Verdict.B, Verdict.B),
                                                      _comparison(Verdict.A, Verdict.UNPARSED)]),
    ])
    lines = evaluate.record_lines(spec, examples, before, after, verdicts)
    assert [line["line"] for line in lines] == [2, 3, 1]
    assert lines[0]["judge"]["score"] == 0.0
    assert [c["outcome"] for c in lines[0]["judge"]["comparisons"]] == ["loss", "loss"]
    assert lines[1]["judge"]["comparisons"][1] == {
        "fineTunedShownAs": "A", "reply": "[[unparsed]]", "verdict": "unparsed",
        "outcome": "tie"}
    assert verdicts.win_rate == (3 + 1 / 2) / 6
    # A task with a per-record metric keeps ranking by it; the verdicts ride along.
    extraction = EvaluationSpec(task=Task.EXTRACTION)
    ranked = evaluate.record_lines(extraction, examples, before, after, verdicts)
    assert [line["line"] for line in ranked] == [2, 1, 3]  # tokenF1: 0 -> 0, +0.33, +1
    assert [line["judge"]["score"] for line in ranked] == [0.0, 1.0, 0.75]
