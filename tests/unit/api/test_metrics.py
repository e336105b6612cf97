"""The task metrics (`kubetune.api.metrics`): hand-worked cases for each, and agreement with
the libraries' own reference calls where a library defines the metric."""

from __future__ import annotations

import math

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from kubetune.api.metrics import (
    Metric,
    MetricScores,
    Task,
    score_answer,
    score_answers,
    selected_metrics,
    squad_tokens,
    token_f1,
    with_loss,
)


def test_two_label_confusion_worked_by_hand() -> None:
    # spam: TP 1, FP 0, FN 1 -> F1 2/3; ham: TP 2, FP 1, FN 0 -> F1 4/5.
    scores = score_answers(Task.CLASSIFICATION, ["spam", "ham", "ham", "ham"],
                           ["spam", "spam", "ham", "ham"], labels=["spam", "ham"])
    assert scores.per_label_f1 == pytest.approx({"spam": 2 / 3, "ham": 4 / 5})
    assert scores.values[Metric.MACRO_F1] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert scores.values[Metric.ACCURACY] == pytest.approx(3 / 4)
    assert scores.values[Metric.OUT_OF_LABELS] == 0
    assert scores.records == 4


def test_three_label_confusion_with_an_answer_outside_the_labels() -> None:
    # billing: TP 1 (#1), FP 1 (#5), FN 1 (#2) -> 1/2; tech: TP 1 (#3), FP 1 (#2), FN 1
    # (#4, answered outside the labels) -> 1/2; sales: TP 1 (#6), FN 1 (#5) -> 2/3.
    answers = ["billing", "tech", "`tech`", "I am not sure", "billing", " sales\n"]
    references = ["billing", "billing", "tech", "tech", "sales", "sales"]
    scores = score_answers(Task.CLASSIFICATION, answers, references,
                           labels=["billing", "tech", "sales"])
    assert scores.per_label_f1 == pytest.approx({"billing": 0.5, "tech": 0.5, "sales": 2 / 3})
    assert scores.values[Metric.MACRO_F1] == pytest.approx((0.5 + 0.5 + 2 / 3) / 3)
    assert scores.values[Metric.ACCURACY] == pytest.approx(3 / 6)
    assert scores.values[Metric.OUT_OF_LABELS] == pytest.approx(1 / 6)
    assert set(scores.values) == {Metric.ACCURACY, Metric.MACRO_F1, Metric.OUT_OF_LABELS}


def test_a_label_neither_expected_nor_answered_has_no_f1() -> None:
    scores = score_answers(Task.CLASSIFICATION, ["a", "b"], ["a", "b"], labels=["a", "b", "c"])
    assert scores.per_label_f1 == {"a": 1.0, "b": 1.0}
    assert scores.values[Metric.MACRO_F1] == 1.0


def test_one_classification_record() -> None:
    labels = ["billing", "tech"]
    assert score_answer(Task.CLASSIFICATION, "tech", "tech", labels) == {
        Metric.ACCURACY: 1.0, Metric.OUT_OF_LABELS: 0.0}
    assert score_answer(Task.CLASSIFICATION, "refund", "tech", labels) == {
        Metric.ACCURACY: 0.0, Metric.OUT_OF_LABELS: 1.0}


@pytest.mark.parametrize(("text", "tokens"), [
    ("The Cat!", ["cat"]),
    ("  an apple,  a   pear\tand THE plum.", ["apple", "pear", "and", "plum"]),
    ("Levi's Stadium", ["levis", "stadium"]),
    ("theatre", ["theatre"]),  # an article only as a whole word
])
def test_squad_normalisation(text: str, tokens: list[str]) -> None:
    assert squad_tokens(text) == tokens


@pytest.mark.parametrize(("answer", "reference", "f1"), [
    ("Denver Broncos", "the Denver Broncos", 1.0),
    ("Broncos", "Denver Broncos", 2 / 3),  # precision 1, recall 1/2
    ("Carolina Panthers", "Denver Broncos", 0.0),
    # SQuAD v1.1 dev, Super Bowl 50: 3 tokens answered, all in the 11-token reference.
    ("Santa Clara, California",
     "Levi's Stadium in the San Francisco Bay Area at Santa Clara, California", 6 / 14),
    ("the", "", 1.0),  # both empty once normalised
    ("", "Denver", 0.0),
])
def test_squad_token_f1(answer: str, reference: str, f1: float) -> None:
    assert token_f1(answer, reference) == pytest.approx(f1)


def test_extraction_scores_a_wrong_and_a_missing_field_and_a_non_json_answer() -> None:
    references = ['{"name": "Ada Lovelace", "city": "London", "born": 1815}', '{"name": "Alan"}']
    answers = ['```json\n{"name": "Ada  Lovelace", "city": "Paris"}\n```', "Alan"]
    first = score_answer(Task.EXTRACTION, answers[0], references[0])
    # 2 pairs answered, 1 right (city wrong); 3 expected (born missing).
    assert first[Metric.FIELD_PRECISION] == pytest.approx(1 / 2)
    assert first[Metric.FIELD_RECALL] == pytest.approx(1 / 3)
    assert first[Metric.EXACT_MATCH] == 0.0
    second = score_answer(Task.EXTRACTION, answers[1], references[1])
    assert Metric.FIELD_PRECISION not in second  # answered no field
    assert second[Metric.FIELD_RECALL] == 0.0
    corpus = score_answers(Task.EXTRACTION, answers, references)
    assert corpus.values[Metric.FIELD_PRECISION] == pytest.approx(1 / 2)  # 1 of 2 answered
    assert corpus.values[Metric.FIELD_RECALL] == pytest.approx(1 / 4)  # 1 of 4 expected
    assert corpus.values[Metric.EXACT_MATCH] == 0.0


def test_field_pairs_of_lists_and_nested_objects() -> None:
    reference = '{"people": ["Ada", "Alan"], "place": {"city": "London"}}'
    answer = '{"people": ["Alan", "Grace"], "place": {"city": "London"}}'
    values = score_answer(Task.EXTRACTION, answer, reference)
    assert values[Metric.FIELD_PRECISION] == pytest.approx(2 / 3)
    assert values[Metric.FIELD_RECALL] == pytest.approx(2 / 3)


def test_answers_that_answer_no_field_have_zero_precision() -> None:
    scores = score_answers(Task.EXTRACTION, ["no idea"], ['{"a": 1}'])
    assert scores.values[Metric.FIELD_PRECISION] == 0.0
    assert scores.values[Metric.FIELD_RECALL] == 0.0


def test_plain_text_extraction_reports_no_field_metrics() -> None:
    scores = score_answers(Task.EXTRACTION, ["Denver Broncos"], ["the Denver Broncos"])
    assert scores.values == {Metric.EXACT_MATCH: 0.0, Metric.TOKEN_F1: 1.0}


HYPOTHESES = ["The cat sat on the mat.", "A quick brown fox jumps over a lazy dog",
              "He read the book yesterday evening."]
REFERENCES = ["The cat is sitting on the mat.", "The quick brown fox jumps over the lazy dog",
              "Yesterday evening he read the book."]


def test_translation_agrees_with_sacrebleu() -> None:
    scores = score_answers(Task.TRANSLATION, HYPOTHESES, REFERENCES)
    chrf = sacrebleu.corpus_chrf(HYPOTHESES, [REFERENCES])
    bleu = sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES])
    assert scores.values[Metric.CHRF] == pytest.approx(chrf.score)
    assert scores.values[Metric.BLEU] == pytest.approx(bleu.score)
    assert 0 < bleu.score < chrf.score < 100
    assert scores.signatures[Metric.CHRF].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0")
    assert scores.signatures[Metric.BLEU].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    one = score_answer(Task.TRANSLATION, HYPOTHESES[0], REFERENCES[0])
    assert one[Metric.CHRF] == pytest.approx(
        sacrebleu.sentence_chrf(HYPOTHESES[0], [REFERENCES[0]]).score)
    assert score_answer(Task.TRANSLATION, REFERENCES[1], REFERENCES[1]) == pytest.approx({
        Metric.CHRF: 100.0, Metric.BLEU: 100.0})


def test_summarization_agrees_with_rouge_score() -> None:
    scores = score_answers(Task.SUMMARIZATION, HYPOTHESES, REFERENCES)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = [scorer.score(r, h)["rougeL"].fmeasure
                for h, r in zip(HYPOTHESES, REFERENCES, strict=True)]
    assert scores.values[Metric.ROUGE_L] == pytest.approx(sum(expected) / 3)
    assert "stemmer:yes" in scores.signatures[Metric.ROUGE_L]
    # "the cat sat on the mat" vs "the cat is sitting on the mat": LCS the cat sit on the mat
    # (stemmed: sat is not sit) -> the cat on the mat, 5 of 6 and 5 of 7 tokens.
    assert expected[0] == pytest.approx(2 * (5 / 6) * (5 / 7) / (5 / 6 + 5 / 7))


def test_only_the_chosen_metrics_are_reported() -> None:
    scores = score_answers(Task.TRANSLATION, HYPOTHESES, REFERENCES, metrics=[Metric.CHRF])
    assert set(scores.values) == {Metric.CHRF}
    assert set(scores.signatures) == {Metric.CHRF}
    assert selected_metrics(Task.CHAT) == (Metric.EVAL_LOSS, Metric.PERPLEXITY,
                                           Metric.JUDGE_WIN_RATE)
    assert selected_metrics(Task.GENERATION, [Metric.EXACT_MATCH]) == (Metric.EXACT_MATCH,)


def test_generation_is_exact_match_and_loss() -> None:
    scores = with_loss(score_answers(Task.GENERATION, ["kubectl get pods", "x"],
                                     ["```\nkubectl get  pods\n```", "y"]), math.log(4))
    assert scores.values == pytest.approx({Metric.EXACT_MATCH: 0.5, Metric.EVAL_LOSS: math.log(4),
                                           Metric.PERPLEXITY: 4.0})


def test_with_loss_keeps_only_the_chosen_and_leaves_a_missing_loss_absent() -> None:
    scores = MetricScores(values={Metric.CHRF: 50.0})
    assert with_loss(scores, None) == scores
    assert with_loss(scores, 1.0, [Metric.CHRF, Metric.EVAL_LOSS]).values == {
        Metric.CHRF: 50.0, Metric.EVAL_LOSS: 1.0}


def test_no_answers_measure_nothing_and_mismatched_lengths_are_refused() -> None:
    assert score_answers(Task.CLASSIFICATION, [], [], labels=["a"]).values == {}
    with pytest.raises(ValueError, match="2 answers for 1 references"):
        score_answers(Task.GENERATION, ["a", "b"], ["a"])


def test_scores_round_trip_through_json() -> None:
    scores = score_answers(Task.CLASSIFICATION, ["a", "b"], ["a", "a"], labels=["a", "b"])
    again = MetricScores.model_validate_json(scores.model_dump_json(by_alias=True))
    assert again == scores
    assert '"perLabelF1"' in scores.model_dump_json(by_alias=True)
