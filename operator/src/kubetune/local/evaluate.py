"""Held-out evaluation for `kubetune run`: exact-match accuracy and the task metrics
(`spec.evaluation`, scored by `kubetune.api.metrics`) through a served endpoint.

Both the base and the fine-tuned model are asked through the same OpenAI-compatible server
(ONNX Runtime GenAI), with greedy decoding, so the comparison differs only in the weights.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kubetune.api.dataplane import AutoChoice, JsonlError, Score, read_jsonl
from kubetune.api.metrics import Metric, MetricScores, Task, exact_match, score_answers
from kubetune.api.spec import EvaluationSpec


def _chat_turns(record: object) -> list[dict[str, str]]:
    """A Chat record's messages, each with a string role and content (raises ValueError)."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    messages = record.get("messages")
    if not isinstance(messages, list):
        raise ValueError('not a Chat record: "messages" must be a list')
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{index}] must be an object")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ValueError(f'messages[{index}] needs a string "{key}"')
    return messages


def load_chat_examples(path: Path) -> list[tuple[list[dict[str, str]], str]]:
    """(prompt messages, reference answer) for every Chat record ending in an assistant turn.
    A bad line raises `JsonlError` (a ValueError): `file:line: problem`."""
    examples = []
    for number, record in read_jsonl(path):
        try:
            messages = _chat_turns(record)
        except ValueError as error:
            raise JsonlError(str(path), number, str(error)) from None
        if messages and messages[-1]["role"] == "assistant":
            examples.append((messages[:-1], messages[-1]["content"]))
    return examples


def chat(base_url: str, model: str, messages: list[dict[str, str]], max_tokens: int = 48,
         timeout: float = 120.0, api_key: str | None = None) -> str:
    """One greedy chat completion from an OpenAI-compatible server (sending `api_key` as
    `Authorization: Bearer`, when the server has one)."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    headers = {"Content-Type": "application/json"}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(
        f"{base_url.rstrip('/')}/chat/completions", data=json.dumps(body).encode(), headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            reply: dict[str, Any] = json.load(response)
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")[:500]
        raise RuntimeError(f"{base_url}: HTTP {error.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as error:
        raise RuntimeError(f"{base_url}: {error}") from None
    return str(reply["choices"][0]["message"]["content"])


def is_ready(root_url: str) -> bool:
    """`/readyz` says 200 (it never asks for the API key)."""
    try:
        with urllib.request.urlopen(f"{root_url}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def evaluate(base_url: str, model: str, examples: list[tuple[list[dict[str, str]], str]],
             keep_samples: int = 5, api_key: str | None = None,
             evaluation: EvaluationSpec | None = None) -> Score:
    """Greedy answers to `examples`: their exact match, and their task metrics."""
    evaluation = evaluation or EvaluationSpec()
    result = Score()
    answers = []
    for messages, reference in examples:
        # An answer much longer than the reference cannot match it; capping the length (at
        # more tokens than the reference can take) keeps a rambling base model from costing
        # minutes without changing any verdict.
        answer = chat(base_url, model, messages, max_tokens=len(reference) // 2 + 24,
                      api_key=api_key)
        answers.append(answer)
        result.total += 1
        result.correct += exact_match(answer, reference)
        result.accuracy = round(result.correct / result.total, 4)
        if len(result.samples) < keep_samples:
            request = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
            result.samples.append({"request": request, "answer": answer,
                                   "reference": reference})
    result.metrics = score_answers(evaluation.task, answers, [r for _, r in examples],
                                   evaluation.labels or (), evaluation.metrics)
    return result


def side_by_side(base: Score | None, tuned: Score, split: str,
                 task: Task = Task.GENERATION) -> str:
    """The comparison table `kubetune run` prints at the end: exact match, then every other
    task metric (Generation has none), base and fine-tuned side by side."""
    def cell(result: Score | None) -> str:
        if result is None:
            return "not measured"
        return f"{100 * result.accuracy:5.1f}%  ({result.correct}/{result.total})"

    lines = [
        f"Exact-match accuracy on the held-out {split} split:",
        f"  base model        {cell(base)}",
        f"  fine-tuned model  {cell(tuned)}",
    ]
    rows = metrics_table(base.metrics if base is not None else None, tuned.metrics,
                         shown={Metric.EXACT_MATCH})
    if rows:
        lines += [f"{task.value} metrics on the held-out {split} split ({tuned.total} "
                  "records):", *rows]
    return "\n".join(lines)


PERCENT_SCALE = frozenset({Metric.CHRF, Metric.BLEU})
"""Metrics sacrebleu reports on 0-100; the others are 0-1 shares, losses or perplexities."""


def metrics_table(base: MetricScores | None, tuned: MetricScores | None,
                  shown: frozenset[Metric] | set[Metric] = frozenset()) -> list[str]:
    """Rows of `metric  base  fine-tuned` for every metric either measured (but those already
    `shown`), each label's F1, and how a library metric was computed; [] when none."""
    base_scores, tuned_scores = base or MetricScores(), tuned or MetricScores()
    names = sorted((m for m in Metric if m not in shown
                    and (m in base_scores.values or m in tuned_scores.values)),
                   key=lambda m: m in (Metric.EVAL_LOSS, Metric.PERPLEXITY))  # the task's first
    if not names:
        return []

    def value(scores: MetricScores | None, metric: Metric) -> str:
        if scores is None:
            return "not measured"
        if metric not in scores.values:
            return "-"
        number = scores.values[metric]
        return f"{number:.2f}" if metric in PERCENT_SCALE else f"{number:.4f}"

    labels = list(dict.fromkeys([*base_scores.per_label_f1, *tuned_scores.per_label_f1]))
    width = max([16, *(len("F1 " + label) for label in labels)])
    rows = [f"  {'metric':{width}} {'base model':>14} {'fine-tuned model':>18}"]
    rows += [f"  {m.value:{width}} {value(base, m):>14} {value(tuned, m):>18}" for m in names]
    for label in labels:
        cells = [f"{s.per_label_f1[label]:.4f}" if label in s.per_label_f1 else "-"
                 for s in (base_scores, tuned_scores)]
        rows.append(f"  {'F1 ' + label:{width}} {cells[0]:>14} {cells[1]:>18}")
    signatures = {**base_scores.signatures, **tuned_scores.signatures}
    rows += [f"  ({metric.value}: {signature})" for metric, signature in signatures.items()
             if metric in names]
    return rows


def auto_summary(choice: AutoChoice, served: str) -> str:
    """What `precision: Auto` measured (export.json): each candidate's held-out score beside
    FP32's, and the one served."""
    lines = [f"Precision Auto served {served} (held-out validation, {choice.held_out_records} "
             f"records; rule: {choice.rule}):", f"  FP32              {choice.fp32.describe()}"]
    for candidate in choice.candidates:
        verdict = "chosen" if candidate.passed else "too far from FP32"
        lines.append(f"  {candidate.weights:17} {candidate.describe()}  {verdict}")
    return "\n".join(lines)
