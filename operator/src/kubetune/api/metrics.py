"""Evaluation tasks and their metrics: which metrics a task reports, which one decides
(the primary), which way is better, and the scores a run reports.

One definition for the trainer's validation, the exported model's check, the gate and
`kubetune run` (issue 29):

- `exact_match`: when a generated answer counts as the reference answer (whitespace and code
  fences aside).
- `score_answer`: one record's values (`evaluation.jsonl`), `score_answers`: a set of records'
  `MetricScores`, `with_loss`: adds the validation loss and perplexity.
- `selected_metrics`: what a run reports (the task's metrics, or the ones the spec names).

The libraries some metrics need (sacrebleu for chrF and BLEU, rouge-score for ROUGE-L) are
imported inside the functions that use them, so the operator, which only compares numbers,
never loads them.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from collections.abc import Collection, Iterator, Mapping, Sequence
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class Task(StrEnum):
    """What the fine-tuned model is for; it picks the metrics that judge it."""

    GENERATION = "Generation"
    CLASSIFICATION = "Classification"
    EXTRACTION = "Extraction"
    TRANSLATION = "Translation"
    SUMMARIZATION = "Summarization"
    CHAT = "Chat"


class Metric(StrEnum):
    """A metric's name as the spec (`serving.gate.min`), status and reports spell it."""

    EVAL_LOSS = "evalLoss"
    """Mean token cross-entropy on the validation records' targets."""
    PERPLEXITY = "perplexity"
    """exp(evalLoss)."""
    EXACT_MATCH = "exactMatch"
    """Share of greedy answers equal to the reference (`exact_match`)."""
    ACCURACY = "accuracy"
    """Classification: share of answers that are the reference label."""
    MACRO_F1 = "macroF1"
    """Classification: unweighted mean of the labels' F1."""
    OUT_OF_LABELS = "outOfLabels"
    """Classification: share of answers that are none of the labels (counted wrong too)."""
    TOKEN_F1 = "tokenF1"
    """Extraction: SQuAD-style token F1 (lower case, no punctuation or articles), mean over
    records."""
    FIELD_PRECISION = "fieldPrecision"
    """Extraction with JSON answers: share of the answered (field, value) pairs that are in
    the reference, micro-averaged."""
    FIELD_RECALL = "fieldRecall"
    """Extraction with JSON answers: share of the reference's (field, value) pairs answered."""
    CHRF = "chrF"
    """Translation: sacrebleu's corpus chrF (0-100)."""
    BLEU = "bleu"
    """Translation: sacrebleu's corpus BLEU (0-100)."""
    ROUGE_L = "rougeL"
    """Summarization: rouge-score's ROUGE-L F-measure, mean over records (0-1)."""
    JUDGE_WIN_RATE = "judgeWinRate"
    """Chat with a judge: share of pairwise comparisons the fine-tuned answer wins, each pair
    judged in both orders (ties count half)."""


TASK_METRICS: Mapping[Task, tuple[Metric, ...]] = {
    Task.GENERATION: (Metric.EXACT_MATCH, Metric.EVAL_LOSS, Metric.PERPLEXITY),
    Task.CLASSIFICATION: (
        Metric.ACCURACY, Metric.MACRO_F1, Metric.OUT_OF_LABELS, Metric.EVAL_LOSS,
        Metric.PERPLEXITY,
    ),
    Task.EXTRACTION: (
        Metric.EXACT_MATCH, Metric.TOKEN_F1, Metric.FIELD_PRECISION, Metric.FIELD_RECALL,
        Metric.EVAL_LOSS, Metric.PERPLEXITY,
    ),
    Task.TRANSLATION: (Metric.CHRF, Metric.BLEU, Metric.EVAL_LOSS, Metric.PERPLEXITY),
    Task.SUMMARIZATION: (Metric.ROUGE_L, Metric.EVAL_LOSS, Metric.PERPLEXITY),
    Task.CHAT: (Metric.EVAL_LOSS, Metric.PERPLEXITY, Metric.JUDGE_WIN_RATE),
}  # fmt: skip
"""Every metric a task can report: a gate may bound only these."""

PRIMARY_METRIC: Mapping[Task, Metric] = {
    Task.GENERATION: Metric.EXACT_MATCH,
    Task.CLASSIFICATION: Metric.MACRO_F1,
    Task.EXTRACTION: Metric.TOKEN_F1,
    Task.TRANSLATION: Metric.CHRF,
    Task.SUMMARIZATION: Metric.ROUGE_L,
    Task.CHAT: Metric.EVAL_LOSS,
}
"""What `mustBeatBase` and `mustBeatServing` compare for a task (Chat's judge win rate is
already a comparison with the base)."""

COMPARED_METRIC: Mapping[Task, Metric] = {
    **PRIMARY_METRIC,
    Task.GENERATION: Metric.EVAL_LOSS,
}
"""What the gate's `mustBeatBase` and `mustBeatServing` compare: the primary metric, except
for `Generation`, which keeps comparing the validation loss as it did before tasks existed
(exact match is 0 for most base models, and any model would tie with it)."""

LOWER_IS_BETTER = frozenset({Metric.EVAL_LOSS, Metric.PERPLEXITY, Metric.OUT_OF_LABELS})


def beats(metric: Metric, candidate: float, other: float) -> bool:
    """Whether `candidate` is strictly better than `other` on `metric`."""
    return candidate < other if metric in LOWER_IS_BETTER else candidate > other


class MetricScores(BaseModel):
    """One model's scores on one evaluation set (validation, or the test split served)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    values: dict[Metric, float] = Field(default_factory=dict)
    """Each measured metric; a metric that could not be measured is absent, never 0."""
    per_label_f1: dict[str, float] = Field(default_factory=dict, alias="perLabelF1")
    """Classification: F1 of each label."""
    signatures: dict[Metric, str] = Field(default_factory=dict)
    """How a library metric was computed (sacrebleu's signature), to compare like with like."""
    records: int = 0
    """Records the generated metrics were measured on."""


def selected_metrics(task: Task, chosen: Collection[Metric] | None = None) -> tuple[Metric, ...]:
    """The metrics a run reports: the task's, or those of them `spec.evaluation.metrics` names
    (admission refuses a metric the task does not have; one here is dropped)."""
    return tuple(m for m in TASK_METRICS[task] if chosen is None or m in chosen)


RECORD_METRIC: Mapping[Task, Metric | None] = {
    Task.GENERATION: Metric.EXACT_MATCH,
    Task.CLASSIFICATION: Metric.ACCURACY,
    Task.EXTRACTION: Metric.TOKEN_F1,
    Task.TRANSLATION: Metric.CHRF,
    Task.SUMMARIZATION: Metric.ROUGE_L,
    Task.CHAT: None,
}
"""The per-record value that stands for the task's primary metric when records are ranked by
how much they regressed (macro-F1 has no per-record value: a record is right or wrong; Chat's
loss is not measured per record)."""


# A model may wrap a command in a code fence or backticks; that is formatting, not content.
_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")


def normalize_answer(text: str) -> str:
    """Whitespace collapsed, surrounding code fences and backticks removed."""
    text = _FENCE.sub("", text.strip()).strip().strip("`").strip()
    return " ".join(text.split())


def exact_match(answer: str, reference: str) -> bool:
    """The one definition of a correct answer: the trainer's validation accuracy (which the
    gate's `minAccuracy` checks), the exported model's check and `kubetune run`'s test-split
    accuracy all use it."""
    return normalize_answer(answer) == normalize_answer(reference)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def squad_tokens(text: str) -> list[str]:
    """SQuAD's official normalisation (lower case, punctuation and the articles a/an/the
    removed, whitespace collapsed), split into tokens."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return _ARTICLES.sub(" ", text).split()


def token_f1(answer: str, reference: str) -> float:
    """SQuAD's token F1 of one answer; two empty answers agree (SQuAD 2.0's rule)."""
    predicted, expected = squad_tokens(answer), squad_tokens(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def json_fields(text: str) -> Counter[tuple[str, str]] | None:
    """An answer's (field, value) pairs: nested objects' keys joined by ".", each item of a
    list a pair of its own, values compared as written (strings with whitespace collapsed).
    None when the text (code fences aside) is not a JSON object or array."""
    try:
        document = json.loads(normalize_answer(text))
    except ValueError:
        return None
    if not isinstance(document, dict | list):
        return None
    return Counter(_flatten("", document))


def _flatten(path: str, value: Any) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _flatten(f"{path}.{key}" if path else str(key), item)
    elif isinstance(value, list):
        for item in value:
            yield from _flatten(path, item)
    elif isinstance(value, str):
        yield path, " ".join(value.split())
    else:
        yield path, json.dumps(value)


def label_of(answer: str, labels: Sequence[str]) -> str | None:
    """Which label an answer is (`exact_match`), or None when it is none of them."""
    return next((label for label in labels if exact_match(answer, label)), None)


def score_answer(task: Task, answer: str, reference: str, labels: Sequence[str] = (),
                 metrics: Collection[Metric] | None = None) -> dict[Metric, float]:
    """One record's values (a line of `evaluation.jsonl`): the task's metrics that have a
    per-record value. Classification reports accuracy and outOfLabels (macro-F1 exists
    only over a set); field precision is absent when the answer answers no field."""
    wanted = set(selected_metrics(task, metrics))
    values: dict[Metric, float] = {}
    if wanted & {Metric.EXACT_MATCH, Metric.ACCURACY}:
        matched = float(exact_match(answer, reference))
        values.update({m: matched for m in (Metric.EXACT_MATCH, Metric.ACCURACY) if m in wanted})
    if Metric.OUT_OF_LABELS in wanted:
        values[Metric.OUT_OF_LABELS] = float(label_of(answer, _label_set(labels, [reference]))
                                             is None)
    if Metric.TOKEN_F1 in wanted:
        values[Metric.TOKEN_F1] = token_f1(answer, reference)
    expected = json_fields(reference)
    if expected is not None and wanted & {Metric.FIELD_PRECISION, Metric.FIELD_RECALL}:
        answered = json_fields(answer) or Counter()
        hits = sum((answered & expected).values())
        if Metric.FIELD_PRECISION in wanted and answered.total():
            values[Metric.FIELD_PRECISION] = hits / answered.total()
        if Metric.FIELD_RECALL in wanted and expected.total():
            values[Metric.FIELD_RECALL] = hits / expected.total()
    if Metric.CHRF in wanted or Metric.BLEU in wanted:
        from sacrebleu.metrics import BLEU, CHRF

        if Metric.CHRF in wanted:
            values[Metric.CHRF] = CHRF().sentence_score(answer, [reference]).score
        if Metric.BLEU in wanted:
            values[Metric.BLEU] = BLEU(effective_order=True).sentence_score(
                answer, [reference]).score
    if Metric.ROUGE_L in wanted:
        values[Metric.ROUGE_L] = _rouge_l([answer], [reference])[0]
    return values


def score_answers(task: Task, answers: Sequence[str], references: Sequence[str],
                  labels: Sequence[str] = (),
                  metrics: Collection[Metric] | None = None) -> MetricScores:
    """A set of greedy answers scored against their references, on the task's metrics (or
    those of them `metrics` names) that answers measure; `with_loss` adds the loss.

    - exactMatch, accuracy: share of `exact_match` answers.
    - macroF1 (Classification): the labels' F1 averaged unweighted; the labels are `labels`
      and any reference outside them, and a label neither expected nor answered has no F1.
      An answer that is none of them (outOfLabels) is wrong for its reference's label.
    - tokenF1: SQuAD's token F1, mean over records.
    - fieldPrecision, fieldRecall: over the records whose reference is JSON, (field, value)
      pairs micro-averaged; an answer that is not JSON answers no field (precision is 0 when
      no answer answers any field).
    - chrF, BLEU: sacrebleu's corpus scores with default settings, signatures recorded.
    - rougeL: rouge-score's ROUGE-L F-measure (stemmed), mean over records.
    """
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers for {len(references)} references")
    wanted = set(selected_metrics(task, metrics))
    scores = MetricScores(records=len(answers))
    if not answers:
        return scores
    values = scores.values
    if wanted & {Metric.EXACT_MATCH, Metric.ACCURACY}:
        matched = _mean([float(exact_match(a, r))
                         for a, r in zip(answers, references, strict=True)])
        values.update({m: matched for m in (Metric.EXACT_MATCH, Metric.ACCURACY) if m in wanted})
    if wanted & {Metric.MACRO_F1, Metric.OUT_OF_LABELS}:
        label_set = _label_set(labels, references)
        predicted = [label_of(a, label_set) for a in answers]
        expected = [label_of(r, label_set) for r in references]
        if Metric.OUT_OF_LABELS in wanted:
            values[Metric.OUT_OF_LABELS] = _mean([float(p is None) for p in predicted])
        if Metric.MACRO_F1 in wanted:
            scores.per_label_f1 = _per_label_f1(label_set, predicted, expected)
            values[Metric.MACRO_F1] = _mean(list(scores.per_label_f1.values()))
    if Metric.TOKEN_F1 in wanted:
        values[Metric.TOKEN_F1] = _mean([token_f1(a, r)
                                         for a, r in zip(answers, references, strict=True)])
    if wanted & {Metric.FIELD_PRECISION, Metric.FIELD_RECALL}:
        _field_scores(answers, references, wanted, scores)
    if wanted & {Metric.CHRF, Metric.BLEU}:
        from sacrebleu.metrics import BLEU, CHRF

        for metric, scorer in ((Metric.CHRF, CHRF()), (Metric.BLEU, BLEU())):
            if metric in wanted:
                values[metric] = scorer.corpus_score(list(answers), [list(references)]).score
                scores.signatures[metric] = str(scorer.get_signature())
    if Metric.ROUGE_L in wanted:
        values[Metric.ROUGE_L] = _mean(_rouge_l(answers, references))
        scores.signatures[Metric.ROUGE_L] = _rouge_signature()
    return scores


def with_loss(scores: MetricScores, eval_loss: float | None,
              metrics: Collection[Metric] | None = None) -> MetricScores:
    """`scores` with the validation loss and its perplexity, exp(loss) (those of them
    `metrics` names, when given); unchanged when no loss was measured."""
    if eval_loss is None:
        return scores
    added = {Metric.EVAL_LOSS: eval_loss, Metric.PERPLEXITY: math.exp(min(eval_loss, 700.0))}
    values = {**scores.values, **{m: v for m, v in added.items()
                                  if metrics is None or m in metrics}}
    return scores.model_copy(update={"values": values})


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _label_set(labels: Sequence[str], references: Sequence[str]) -> list[str]:
    """The labels, then each reference none of them matches (normalised), in order."""
    found = [normalize_answer(label) for label in labels]
    for reference in references:
        if label_of(reference, found) is None:
            found.append(normalize_answer(reference))
    return found


def _per_label_f1(labels: Sequence[str], predicted: Sequence[str | None],
                  expected: Sequence[str | None]) -> dict[str, float]:
    """Each label's F1 = 2TP / (2TP + FP + FN); a label never expected nor answered has none."""
    f1 = {}
    for label in labels:
        pairs = list(zip(predicted, expected, strict=True))
        true_positives = sum(p == label and e == label for p, e in pairs)
        false_positives = sum(p == label and e != label for p, e in pairs)
        false_negatives = sum(p != label and e == label for p, e in pairs)
        counted = 2 * true_positives + false_positives + false_negatives
        if counted:
            f1[label] = 2 * true_positives / counted
    return f1


def _field_scores(answers: Sequence[str], references: Sequence[str], wanted: set[Metric],
                  scores: MetricScores) -> None:
    answered_total = expected_total = hits = 0
    structured = False
    for answer, reference in zip(answers, references, strict=True):
        expected = json_fields(reference)
        if expected is None:
            continue
        structured = True
        answered = json_fields(answer) or Counter()
        hits += sum((answered & expected).values())
        answered_total += answered.total()
        expected_total += expected.total()
    if not structured:
        return
    if Metric.FIELD_PRECISION in wanted:
        scores.values[Metric.FIELD_PRECISION] = hits / answered_total if answered_total else 0.0
    if Metric.FIELD_RECALL in wanted and expected_total:
        scores.values[Metric.FIELD_RECALL] = hits / expected_total


ROUGE_STEMMER = True
"""ROUGE-L with rouge-score's Porter stemmer, as summarization papers and Vertex report it."""


def _rouge_l(answers: Sequence[str], references: Sequence[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=ROUGE_STEMMER)
    return [scorer.score(reference, answer)["rougeL"].fmeasure
            for answer, reference in zip(answers, references, strict=True)]


def _rouge_signature() -> str:
    from importlib.metadata import version

    return f"rougeL|fmeasure|stemmer:{'yes' if ROUGE_STEMMER else 'no'}|mean:records|" \
           f"version:{version('rouge-score')}"
