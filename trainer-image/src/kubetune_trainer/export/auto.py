"""`precision: Auto` on CPU: the fastest quantized candidate that keeps the FP32 model's quality.

Candidates go fastest first (single-stream decode on the bench machine, bench/RESULTS.md). Each
is built and scored on the run's held-out records (`kubetune_trainer.heldout`) against the FP32
model in PyTorch (which the FP32 export matches token for token: `parity`):

- with reference answers: the greedy answers on the task's primary metric (`PRIMARY_METRIC`:
  exact match for Generation, macroF1, tokenF1, chrF, rougeL), the metric the run's gate
  judged it by. A candidate passes when its score is at most `TOLERANCE` of the metric's
  range below FP32's (one point: 0.01 of exact match, 1.0 of chrF);
- without any, or for a task judged by its loss (Chat: free answers, whose exact match is 0
  for FP32 and every candidate alike, so it would pass any of them): teacher-forced top-1
  agreement with FP32 over the target tokens and their mean loss. A candidate passes with
  agreement of at least `AGREEMENT_FLOOR` and a loss at most `LOSS_TOLERANCE` above FP32's.

The first that passes is exported; when none does, FP32 is. With no held-out records at all
(a plain model directory), the candidates are scored teacher-forced on PyTorch's greedy
continuations of the parity prompts. `decide` is the pure rule; the rest is measurement.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kubetune.api.dataplane import CandidateScore
from kubetune.api.metrics import (
    LOWER_IS_BETTER,
    PRIMARY_METRIC,
    Metric,
    Task,
    exact_match,
    score_answers,
)
from kubetune.api.spec import Precision, Quantization
from kubetune_trainer.genai_model import DecoderLayout, kv_dtype, stop_token_ids
from kubetune_trainer.heldout import IGNORE, HeldOut, HeldOutRecord

TOLERANCE = 0.01
"""The task's metric may fall at most this share of its range below FP32's: one point."""
PERCENT_METRICS = frozenset({Metric.CHRF, Metric.BLEU})
"""Metrics on a 0-100 scale (sacrebleu's); the others answers score are 0-1."""
AGREEMENT_FLOOR = 0.97
LOSS_TOLERANCE = 0.05
"""Mean target-token loss (nats) may rise at most this much above FP32's."""
ANSWER_SLACK = 8
"""Tokens past the reference's length a greedy answer may run (as the trainer's evaluation)."""


@dataclass(frozen=True)
class Candidate:
    precision: Precision
    quantization: Quantization | None = None

    def names(self) -> dict[str, str | None]:
        """Its precision and method as export.json spells them."""
        method = self.quantization
        return {"precision": self.precision.value,
                "quantization": None if method is None else method.value}


def candidates(calibrated: bool) -> tuple[Candidate, ...]:
    """Fastest first, as measured on the quickstart's model (bench/RESULTS.md, issue 14).
    GPTQ has RTN's speed and, given calibration tokens, rounds better: it takes RTN's place.
    Zero points (k-quant) and 8-bit weights keep more accuracy at less speed."""
    first = Quantization.GPTQ if calibrated else Quantization.RTN
    return (
        Candidate(Precision.INT4, first),
        Candidate(Precision.INT4, Quantization.K_QUANT_MIXED),
        Candidate(Precision.INT8),
    )


@dataclass(frozen=True)
class Score:
    accuracy: float | None
    """Greedy exact match over the answered records; None without any."""
    agreement: float
    """Teacher-forced top-1 agreement with FP32's argmax (FP32 itself: 1)."""
    loss: float
    """Mean loss of the target tokens."""
    task_score: float | None = None
    """The greedy answers on `judged_metric(task)`; None without answers or such a metric."""


def judged_metric(task: Task) -> Metric | None:
    """The metric candidates' answers are judged by: the task's primary one, or None for a
    task judged by its loss (its candidates are compared teacher-forced)."""
    metric = PRIMARY_METRIC[task]
    return None if metric in LOWER_IS_BETTER else metric


def tolerance(metric: Metric) -> float:
    return TOLERANCE * (100 if metric in PERCENT_METRICS else 1)


def decide(candidate: Score, fp32: Score, task: Task = Task.GENERATION) -> tuple[bool, str]:
    """Whether a candidate keeps FP32's quality, and why (in the tolerance's own terms)."""
    metric = judged_metric(task)
    if metric is not None and fp32.task_score is not None and candidate.task_score is not None:
        slack = tolerance(metric)
        verdict = candidate.task_score >= fp32.task_score - slack - 1e-9
        return verdict, (f"{metric} {candidate.task_score:.3f} "
                         f"{'>=' if verdict else '<'} FP32's {fp32.task_score:.3f} - {slack:g}")
    ceiling = fp32.loss + LOSS_TOLERANCE
    verdict = candidate.agreement >= AGREEMENT_FLOOR and candidate.loss <= ceiling
    return verdict, (f"teacher-forced agreement {candidate.agreement:.3f} (floor "
                     f"{AGREEMENT_FLOOR}), loss {candidate.loss:.3f} (ceiling {ceiling:.3f})")


@dataclass(frozen=True)
class Reference:
    """FP32's view of the held-out records: its score and its argmax at every target."""

    held_out: HeldOut
    score: Score
    argmax: list[np.ndarray]


def fallback_held_out(model_dir: Path, serving: Any, tokens: int) -> HeldOut:
    """Held-out records when the run left none: the parity prompts with PyTorch's greedy
    continuations as targets (no answers, so candidates are judged teacher-forced)."""
    from kubetune_trainer.export import parity

    prompts = parity.prompt_ids(serving)
    continuations = parity.torch_greedy(model_dir, prompts, tokens)
    return HeldOut(records=[
        HeldOutRecord(input_ids=p + c, labels=[IGNORE] * len(p) + c)
        for p, c in zip(prompts, continuations, strict=True)
    ])


def target_tokens(record: HeldOutRecord) -> tuple[list[int], list[int]]:
    positions = record.target_positions()
    return positions, [record.input_ids[p + 1] for p in positions]


def target_loss(logits: np.ndarray, positions: list[int], targets: list[int]) -> float:
    """Summed cross-entropy of `targets` at `positions` of (length, vocab) logits."""
    rows = logits[positions].astype(np.float64)
    top = rows.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(rows - top).sum(axis=1))
    return float((log_norm - rows[np.arange(len(targets)), targets]).sum())


def pytorch_stop_ids(model_dir: Path) -> list[int]:
    """The tokens PyTorch's greedy answers end on: generation_config.json's `eos_token_id`
    (one or a list) and the tokenizer's `eos_token`: what the builder writes into
    genai_config.json and the exported model stops on (`genai_model.stop_token_ids`)."""
    from transformers import GenerationConfig

    from kubetune_trainer.tokenizer import ServingTokenizer

    listed = GenerationConfig.from_pretrained(str(model_dir)).eos_token_id
    ids = set(listed if isinstance(listed, list) else [] if listed is None else [listed])
    eos = ServingTokenizer.load(model_dir).eos_token_id
    return sorted(ids | ({eos} if eos is not None else set()))


def torch_reference(model_dir: Path, held_out: HeldOut) -> Reference:
    """Score the FP32 model in PyTorch: greedy answers, argmax and loss at each target."""
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    stops = pytorch_stop_ids(model_dir)
    argmax, loss, count = [], 0.0, 0
    with torch.inference_mode():
        for record in held_out.records:
            positions, targets = target_tokens(record)
            logits = model(input_ids=torch.tensor([record.input_ids])).logits[0].numpy()
            argmax.append(logits[positions].argmax(axis=1))
            loss += target_loss(logits, positions, targets)
            count += len(targets)

        def greedy(prompt: list[int], budget: int) -> list[int]:
            output = model.generate(
                input_ids=torch.tensor([prompt]), max_new_tokens=budget, do_sample=False,
                eos_token_id=stops or None, pad_token_id=stops[0] if stops else None,
            )
            return [int(t) for t in output[0, len(prompt):]]

        accuracy, task_score = answer_scores(held_out, greedy, model_dir)
    return Reference(held_out, Score(accuracy, 1.0, loss / max(count, 1), task_score), argmax)


def greedy_answers(held_out: HeldOut, greedy: Any, tokenizer_dir: Path) -> list[str]:
    """The greedy answer to each of `held_out.answers`, at most `ANSWER_SLACK` tokens longer
    than its reference."""
    from kubetune_trainer.tokenizer import ServingTokenizer

    tokenizer = ServingTokenizer.load(tokenizer_dir)
    answers = []
    for record in held_out.answers:
        assert record.prompt is not None and record.reference is not None
        budget = len(tokenizer.encode(record.reference, add_special_tokens=False)) + ANSWER_SLACK
        answers.append(tokenizer.decode(greedy(record.prompt, budget)))
    return answers


def answer_scores(held_out: HeldOut, greedy: Any,
                  tokenizer_dir: Path) -> tuple[float | None, float | None]:
    """(exact match, the task's judged metric) of the greedy answers; Nones without any."""
    answers = greedy_answers(held_out, greedy, tokenizer_dir)
    if not answers:
        return None, None
    references = [str(record.reference) for record in held_out.answers]
    pairs = zip(answers, references, strict=True)
    accuracy = sum(exact_match(a, r) for a, r in pairs) / len(answers)
    metric = judged_metric(held_out.task)
    if metric is None:
        return accuracy, None
    scores = score_answers(held_out.task, answers, references, held_out.labels, [metric])
    return accuracy, scores.values.get(metric)


class OnnxDecoder:
    """An exported model in plain ONNX Runtime: all-position logits of a whole sequence, and
    greedy decoding with its key/value cache, ending an answer where the server does."""

    def __init__(self, onnx_dir: Path) -> None:
        from kubetune_trainer.tokenizer import ServingTokenizer

        layout = DecoderLayout.read(onnx_dir)
        self.session = layout.session()
        self.kv_names = layout.kv_names
        self.kv_shape = layout.kv_shape
        self.kv_dtype = kv_dtype(self.session)
        self.outputs = layout.output_names
        self.stops = stop_token_ids(onnx_dir, ServingTokenizer.load(onnx_dir))

    def run(self, ids: list[int], past: list[np.ndarray] | None,
            length: int) -> tuple[np.ndarray, list[np.ndarray]]:
        heads, size = self.kv_shape
        past = past or [np.zeros((1, heads, 0, size), self.kv_dtype)] * len(self.kv_names)
        feeds = {"input_ids": np.array([ids], np.int64),
                 "attention_mask": np.ones((1, length), np.int64),
                 **dict(zip(self.kv_names, past, strict=True))}
        logits, *present = self.session.run(self.outputs, feeds)
        return logits[0], present

    def greedy(self, prompt: list[int], budget: int) -> list[int]:
        logits, past = self.run(prompt, None, len(prompt))
        generated: list[int] = []
        while len(generated) < budget:
            token = int(logits[-1].argmax())
            if token in self.stops:
                break
            generated.append(token)
            logits, past = self.run([token], past, len(prompt) + len(generated))
        return generated


def onnx_score(onnx_dir: Path, reference: Reference) -> Score:
    decoder = OnnxDecoder(onnx_dir)
    hits, loss, count = 0, 0.0, 0
    for record, wanted in zip(reference.held_out.records, reference.argmax, strict=True):
        positions, targets = target_tokens(record)
        logits, _ = decoder.run(record.input_ids, None, len(record.input_ids))
        hits += int((logits[positions].argmax(axis=1) == wanted).sum())
        loss += target_loss(logits, positions, targets)
        count += len(targets)
    accuracy, task_score = answer_scores(reference.held_out, decoder.greedy, onnx_dir)
    return Score(accuracy, hits / max(count, 1), loss / max(count, 1), task_score)


def rule(fp32: Score, task: Task = Task.GENERATION) -> str:
    """`decide`'s rule for this held-out set, in words."""
    metric = judged_metric(task)
    if metric is not None and fp32.task_score is not None:
        return f"{metric} at most {tolerance(metric):g} below FP32's"
    return (f"teacher-forced agreement >= {AGREEMENT_FLOOR} and loss at most {LOSS_TOLERANCE} "
            "above FP32's")


def score_report(candidate: Candidate, score: Score, passed: bool, reason: str,
                 seconds: float, task: Task = Task.GENERATION) -> CandidateScore:
    metric = judged_metric(task) if score.task_score is not None else None
    return CandidateScore(
        **candidate.names(),
        accuracy=None if score.accuracy is None else round(score.accuracy, 4),
        agreement=round(score.agreement, 4), loss=round(score.loss, 4),
        task_metric=None if metric is None else str(metric),
        task_score=None if score.task_score is None else round(score.task_score, 4),
        passed=passed, reason=reason, seconds=round(seconds, 1),
    )


def failed_build(candidate: Candidate, failure: str, seconds: float,
                 stage: str = "build failed") -> CandidateScore:
    """A candidate the builder could not build (or ONNX Runtime could not run: `stage`):
    tried, not passed, the failure's tail kept."""
    return CandidateScore(
        **candidate.names(),
        passed=False, reason=f"{stage}: {failure[-300:]}", seconds=round(seconds, 1),
    )


def onnxruntime_errors() -> tuple[type[Exception], ...]:
    """What ONNX Runtime raises when it will not load or run a graph (no common base)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(value for value in vars(state).values()
                 if isinstance(value, type) and issubclass(value, Exception))


def try_candidate(candidate: Candidate, onnx_dir: Path, reference: Reference,
                  build_seconds: float) -> CandidateScore:
    """Score a built candidate and judge it (`decide`)."""
    started = time.monotonic()
    score = onnx_score(onnx_dir, reference)
    passed, reason = decide(score, reference.score, reference.held_out.task)
    if math.isnan(score.loss):
        passed, reason = False, "loss is NaN"
    return score_report(candidate, score, passed, reason,
                        build_seconds + time.monotonic() - started, reference.held_out.task)
