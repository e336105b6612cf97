"""Validation loss, greedy answers and the task's metrics on them.

The loss is the mean cross-entropy over the validation records' target tokens (the same
tokens training puts a loss on). The greedy answers cover records that carry a reference
answer (Chat: the last assistant turn; Instruction: `output`; Completion: `completion`), at
most `$KUBETUNE_EVAL_MAX_RECORDS` of them (default 50). Accuracy is their exact match
(`kubetune.api.metrics.exact_match`: whitespace and code fences aside, the definition
`kubetune run` also uses); `task_scores` scores them on `spec.evaluation`'s task metrics
(`kubetune.api.metrics.score_answers`) and `record_lines` compares base and fine-tuned answer
by answer for `evaluation.jsonl`, the records that regressed most first.

With `spec.evaluation.judge` set (and `judgeWinRate` among the run's metrics), `judge_items`
gives the LLM judge each answered record's conversation and both models' answers
(`kubetune_trainer.judge`), and `record_lines` adds each record's verdicts; a Chat run, which
has no per-record metric, then lists the records the judge liked least first.

The base model's evaluation, its answers included, is saved beside the checkpoints
(`base-evaluation.json`) with a fingerprint of what it measured: a resumed attempt reads it
back instead of generating the same greedy answers again, which on a CPU-limited pod costs as
long as the training itself. Its metrics are recomputed from the saved answers, so a change
of task or metrics between attempts needs no new generation.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kubetune.api.metrics import (
    LOWER_IS_BETTER,
    RECORD_METRIC,
    Metric,
    MetricScores,
    exact_match,
    score_answer,
    score_answers,
    selected_metrics,
    with_loss,
)
from kubetune.api.spec import EvaluationSpec
from kubetune_trainer.judge import JudgeItem, JudgeResult
from kubetune_trainer.train.data import Example
from kubetune_trainer.train.encoding import Encoded, encode_prompt
from kubetune_trainer.train.microbatches import collate, split_micro_batches
from kubetune_trainer.train.stepper import token_loss_sum

DEFAULT_MAX_RECORDS = 50
DEFAULT_JUDGE_MAX_TOKENS = 256
"""Tokens the judge may reply with: room for a short reasoning before its verdict."""
BASE_EVALUATION = "base-evaluation.json"
SAVED_FORMAT = 2
"""Bumped when `Evaluation` gains what a reused one must hold (2: the answers), so a file an
older trainer saved is measured again rather than read without them."""


@dataclass
class Evaluation:
    loss: float | None = None
    accuracy: float | None = None
    records: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    """The greedy answer to each of `answered(examples)`, in order."""


def max_records() -> int:
    return int(os.environ.get("KUBETUNE_EVAL_MAX_RECORDS", str(DEFAULT_MAX_RECORDS)))


def judge_max_tokens() -> int:
    return int(os.environ.get("KUBETUNE_JUDGE_MAX_TOKENS", str(DEFAULT_JUDGE_MAX_TOKENS)))


@torch.no_grad()
def eval_loss(model: torch.nn.Module, records: Sequence[Encoded], token_budget: int,
              device: torch.device) -> float | None:
    """Mean token cross-entropy over `records` (packed, padding-free)."""
    records = [r for r in records if r.targets]
    if not records:
        return None
    was_training = model.training
    model.eval()
    groups = split_micro_batches([len(r.input_ids) for r in records], 1, True, token_budget, 1)
    total = 0.0
    for group in groups:
        batch = collate([records[i] for i in group], True, 0)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        total += float(token_loss_sum(model, batch))
    model.train(was_training)
    return total / sum(r.targets for r in records)


def answered(examples: Sequence[Example]) -> list[Example]:
    """The validation records greedy answers are generated for: the first `max_records()`
    with a reference answer."""
    return [e for e in examples if e.reference is not None][: max_records()]


@torch.no_grad()
def accuracy(model: Any, tokenizer: Any, examples: Sequence[Example], device: torch.device,
             batch_size: int = 8) -> tuple[float | None, int, list[dict[str, Any]], list[str]]:
    """Exact-match accuracy of greedy answers; (accuracy, records used, a few samples, every
    answer)."""
    chosen = answered(examples)
    if not chosen:
        return None, 0, [], []
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id
    hits, samples, answers = 0, list[dict[str, Any]](), list[str]()
    for start in range(0, len(chosen), batch_size):
        batch = chosen[start : start + batch_size]
        prompts = [encode_prompt(tokenizer, e) for e in batch]
        references = [str(e.reference) for e in batch]
        budget = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        output = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=min(budget + 8, 256),
            do_sample=False, pad_token_id=pad, use_cache=True,
        )
        for row, reference in zip(output[:, width:], references, strict=True):
            answer = tokenizer.decode(row, skip_special_tokens=True)
            answers.append(answer)
            matched = exact_match(answer, reference)
            hits += matched
            if len(samples) < 5:
                samples.append({"reference": reference, "answer": answer, "match": matched})
    model.train(was_training)
    return hits / len(chosen), len(chosen), samples, answers


def evaluate(model: Any, tokenizer: Any, encoded: Sequence[Encoded], examples: Sequence[Example],
             token_budget: int, device: torch.device, with_accuracy: bool = True) -> Evaluation:
    result = Evaluation(loss=eval_loss(model, encoded, token_budget, device))
    if with_accuracy:
        result.accuracy, result.records, result.samples, result.answers = accuracy(
            model, tokenizer, examples, device
        )
    return result


def task_scores(spec: EvaluationSpec, evaluation: Evaluation,
                examples: Sequence[Example]) -> MetricScores:
    """One model's `MetricScores` on the task's metrics (those `spec.metrics` names, when it
    does): its greedy answers to `answered(examples)` scored, and its validation loss."""
    references = [str(e.reference) for e in answered(examples)]
    scores = MetricScores()
    if evaluation.answers:
        scores = score_answers(spec.task, evaluation.answers, references, spec.labels or (),
                               spec.metrics)
    return with_loss(scores, evaluation.loss, selected_metrics(spec.task, spec.metrics))


def prompt_text(example: Example) -> str:
    """What a record asks, for a person reading `evaluation.jsonl`: the last user turn (a
    chat's) or the completion prompt."""
    users = [content for role, content in example.messages[:-1] if role == "user"]
    return users[-1] if users else example.prompt


def judged(spec: EvaluationSpec) -> bool:
    """Whether the run asks the LLM judge: a judge is set and `judgeWinRate` is among the
    run's metrics (admission refuses a judge whose win rate the run would not report)."""
    return spec.judge is not None and Metric.JUDGE_WIN_RATE in selected_metrics(spec.task,
                                                                                 spec.metrics)


def judge_prompt(example: Example) -> str:
    """What the judge is shown as the user's request: the conversation up to the answer
    (each earlier turn labelled by its role, so a follow-up question keeps its context), or
    the completion prompt."""
    turns = example.messages[:-1]
    if len(turns) > 1 or (turns and turns[0][0] != "user"):
        return "\n\n".join(f"{role}: {content}" for role, content in turns)
    return prompt_text(example)


def judge_items(examples: Sequence[Example], before: Evaluation,
                after: Evaluation) -> list[JudgeItem]:
    """The judge's questions: each of `answered(examples)` with the base and the fine-tuned
    model's answers to it, in order; none when either model's answers are missing."""
    chosen = answered(examples)
    if not chosen or len(before.answers) != len(chosen) or len(after.answers) != len(chosen):
        return []
    return [JudgeItem(prompt=judge_prompt(example), base_answer=base, fine_tuned_answer=tuned)
            for example, base, tuned in zip(chosen, before.answers, after.answers, strict=True)]


def record_lines(spec: EvaluationSpec, examples: Sequence[Example], before: Evaluation,
                 after: Evaluation, verdicts: JudgeResult | None = None) -> list[dict[str, Any]]:
    """`evaluation.jsonl`: base and fine-tuned answers record by record with each chosen
    metric that has a per-record value, and the one standing for the task's primary metric
    (`RECORD_METRIC`: a classifier's accuracy when only macro-F1 was chosen), by which the
    records that regressed most come first; ties keep dataset order. With the judge's
    `verdicts` (items in the same order), each line gains `judge`: the fine-tuned answer's
    score on it (1 won both orders, 0 lost both) and both comparisons; a task without a
    per-record metric (Chat) then lists the lowest scores first, else keeps dataset order."""
    chosen = answered(examples)
    if not chosen or len(before.answers) != len(chosen) or len(after.answers) != len(chosen):
        return []
    ranked_by = RECORD_METRIC[spec.task]
    wanted = None if spec.metrics is None else [*spec.metrics, *filter(None, [ranked_by])]
    labels = spec.labels or ()
    by_index = {item.index: item for item in verdicts.items} if verdicts is not None else {}
    lines: list[dict[str, Any]] = []
    for index, (example, base, tuned) in enumerate(
            zip(chosen, before.answers, after.answers, strict=True)):
        reference = str(example.reference)
        line: dict[str, Any] = {
            "line": example.line, "input": prompt_text(example), "expected": reference,
            "baseAnswer": base, "fineTunedAnswer": tuned,
            "base": score_answer(spec.task, base, reference, labels, wanted),
            "fineTuned": score_answer(spec.task, tuned, reference, labels, wanted),
        }
        if index in by_index:
            line["judge"] = by_index[index].model_dump(by_alias=True, mode="json",
                                                       exclude={"index"})
        lines.append(line)
    if ranked_by is not None:
        metric = ranked_by
        lines.sort(key=lambda line: -regression(metric, line["base"][metric],
                                                line["fineTuned"][metric]))
    elif by_index:
        lines.sort(key=lambda line: line["judge"]["score"] if "judge" in line else 1.0)
    return lines


def regression(metric: Metric, base: float, tuned: float) -> float:
    """How much worse the fine-tuned value is than the base's (negative: better)."""
    return tuned - base if metric in LOWER_IS_BETTER else base - tuned


def base_fingerprint(base: str, encoded: Sequence[Encoded], examples: Sequence[Example]) -> str:
    """What the base model's evaluation depends on: `base` (the model source, revision and how
    it was loaded), the validation tokens and references, and how many records are generated
    for. Equal fingerprints measure the same thing."""
    digest = hashlib.sha256(json.dumps([base, max_records(), SAVED_FORMAT]).encode())
    for record in encoded:
        digest.update(json.dumps([record.input_ids, record.labels]).encode())
    for example in examples:
        digest.update(json.dumps(example.reference).encode())
    return digest.hexdigest()


def saved_base(path: Path, fingerprint: str) -> Evaluation | None:
    """The base evaluation an earlier attempt saved at `path`, if it measured `fingerprint`."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict) or document.get("fingerprint") != fingerprint:
        return None
    try:
        return Evaluation(**document["evaluation"])
    except (KeyError, TypeError):
        return None


def save_base(path: Path, fingerprint: str, evaluation: Evaluation) -> None:
    """Write the base evaluation atomically (a torn file would only cost a re-evaluation, but a
    rename keeps it from ever being half read)."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps({"fingerprint": fingerprint, "evaluation": asdict(evaluation)}))
    staging.replace(path)
