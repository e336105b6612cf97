"""Evaluation tasks and their metrics: which metrics a task reports, which one decides
(the primary), which way is better, and the scores a run reports.

One definition for the trainer's validation, the exported model's check, the gate and
`kubetune run` (issue 29). The scoring functions themselves (`score_answer`, `score_answers`)
live here too once written; libraries they need (sacrebleu, rouge-score) are imported inside
them, so the operator, which only compares numbers, never loads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

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
    """Share of greedy answers equal to the reference (`dataplane.exact_match`)."""
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
