"""The LLM judge: base vs fine-tuned answers compared pairwise by a model behind an
OpenAI-compatible chat completions endpoint (`spec.evaluation.judge`), in both orders.

    judge_pairwise(spec: JudgeSpec, api_key: str | None, items: Sequence[JudgeItem], *,
                   max_tokens: int = 256, timeout: float = 120.0) -> JudgeResult

Each `JudgeItem` (the prompt as the user saw it, the base model's answer, the fine-tuned
model's answer) is judged twice: once with the base answer shown as A and the fine-tuned one as
B, once the other way round, so a judge that prefers a position favours neither model. The
result counts every comparison (two per item): `wins`, `losses` and `ties` of the fine-tuned
model, `unparsed` replies (they name neither answer, and count as ties: `ties` includes them),
and `win_rate` = (wins + ties / 2) / comparisons, the `judgeWinRate` metric
(`kubetune.api.metrics.Metric.JUDGE_WIN_RATE`). Per item verdicts and the judge's replies are
kept for `evaluation.jsonl`.

The caller reads the API key from the environment the operator fills from
`judge.apiKeySecretRef` (it is sent as `Authorization: Bearer`, never logged). A judge that
cannot be reached, or answers an HTTP error, raises `JudgeError` naming the endpoint and the
status: a missing verdict is not a tie. `JudgeError.retryable` says whether asking again can
help. A real judge must be far stronger than the model it
judges; the tests use the built-in 135M model only to prove the plumbing.

`judge_messages` (the prompt) and `parse_verdict` (the reply) are pure functions. Imports only
`kubetune.api` from the control plane.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from kubetune.api.spec import JudgeSpec

DEFAULT_RUBRIC = (
    "Prefer the answer that does what the user asked: correct, complete, and in the form the "
    "user wanted. Do not prefer an answer for being longer. Judge the content, not which "
    "answer comes first."
)
SYSTEM_PROMPT = (
    "You are an impartial judge. You compare two answers, A and B, to the same user request "
    "and say which one is better."
)
VERDICT_INSTRUCTION = (
    'End your reply with the verdict on a line of its own: "[[A]]" if answer A is better, '
    '"[[B]]" if answer B is better, or "[[tie]]" if they are equally good.'
)


class Verdict(StrEnum):
    """What a judge's reply says, by position."""

    A = "A"
    B = "B"
    TIE = "tie"
    UNPARSED = "unparsed"
    """The reply names neither answer (or both, without a verdict): counted as a tie."""


class Outcome(StrEnum):
    """A comparison's result for the fine-tuned model."""

    WIN = "win"
    LOSS = "loss"
    TIE = "tie"


class JudgeModel(BaseModel):
    """camelCase in JSON (`report.json`, `evaluation.jsonl`), as the API's models are."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class JudgeItem(JudgeModel):
    """One prompt and the two models' answers to it."""

    prompt: str
    base_answer: str
    fine_tuned_answer: str


class Comparison(JudgeModel):
    """One judging request: which model was shown as A, what the judge replied, what it meant."""

    fine_tuned_shown_as: Verdict
    """`A` or `B`: the position of the fine-tuned answer."""
    reply: str
    verdict: Verdict
    outcome: Outcome


class ItemVerdict(JudgeModel):
    """Both orders' comparisons of one item, and the fine-tuned model's score on it."""

    index: int
    comparisons: list[Comparison]
    score: float
    """Share of the item's comparisons the fine-tuned answer won (a tie counts half)."""


class JudgeResult(JudgeModel):
    """The fine-tuned model's record against the base model, over every comparison."""

    win_rate: float | None
    """(wins + ties / 2) / comparisons; None when there was nothing to judge."""
    comparisons: int
    wins: int
    losses: int
    ties: int
    """Ties, the unparsed replies included."""
    unparsed: int
    """Replies that named neither answer (counted in `ties` too)."""
    items: list[ItemVerdict] = Field(default_factory=list)


class JudgeError(RuntimeError):
    """The judge could not be asked (unreachable, an HTTP error, a reply that is not a chat
    completion)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        """The HTTP status the judge answered, None when it did not answer one."""

    @property
    def retryable(self) -> bool:
        """Whether asking again may get an answer: the judge unreachable or timing out, busy
        (408, 429) or failing (5xx) may recover; any other refusal (401 a wrong key, 404 a
        wrong endpoint path or model) answers the same question the same way."""
        return self.status is None or self.status in (408, 429) or self.status >= 500


def judge_messages(prompt: str, answer_a: str, answer_b: str, rubric: str | None = None
                   ) -> list[dict[str, str]]:
    """The chat messages asking the judge to compare `answer_a` and `answer_b` to `prompt`."""
    user = (
        f"{rubric or DEFAULT_RUBRIC}\n\n"
        f"[User request]\n{prompt}\n[End of user request]\n\n"
        f"[Answer A]\n{answer_a}\n[End of answer A]\n\n"
        f"[Answer B]\n{answer_b}\n[End of answer B]\n\n"
        f"Which answer is better? {VERDICT_INSTRUCTION}"
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


# Upper-case A and B only: a lower-case "a" is the article ("a better answer").
_BRACKETED = re.compile(r"\[\[\s*([AB]|(?i:tie|draw|c))\s*\]\]")
_STATED = re.compile(
    r"(?i:verdict|winner|better (?:answer|response|one)|i (?:prefer|choose|pick)|choice)"
    r"(?i:\s+is)?\s*[:=\-]?\s*(?i:(?:answer|response|assistant|option)\s+)?[\"'*(\[]*"
    r"([AB]|(?i:tie|draw))\b"
)
_NAMED = re.compile(r"(?i:answer|response|assistant|option)\s+([AB])\b")
_TIE_WORDS = re.compile(r"(?i)\b(tie|draw|equal|equally|neither is better|the same)\b")
# The prompt's own markers: a judge that echoes "[End of answer A]" has not chosen A.
_ECHOED_MARKERS = re.compile(r"(?i)\[\s*(end of\s+)?(answer\s+[AB]|user request)\s*\]")


def _letter(word: str) -> Verdict:
    upper = word.upper()
    return Verdict(upper) if upper in ("A", "B") else Verdict.TIE


def parse_verdict(reply: str) -> Verdict:
    """The verdict of a judge's reply: its last `[[A]]`/`[[B]]`/`[[tie]]`, else its last stated
    verdict ("Verdict: B", "the better answer is A"), else a bare reply ("B", "Answer A."),
    else the one answer it names, else a tie it states; a reply that decides nothing is
    `UNPARSED`. The prompt's markers echoed back ("[End of answer A]") name nothing."""
    reply = _ECHOED_MARKERS.sub(" ", reply)
    if bracketed := _BRACKETED.findall(reply):
        return _letter(bracketed[-1])
    if stated := _STATED.findall(reply):
        return _letter(stated[-1])
    bare = re.sub(r"(?i)^(answer|response|assistant|option)\s+", "", reply.strip(" \t\n*\"'`.[]()"))
    if bare.upper() in ("A", "B") or bare.lower() in ("tie", "draw"):
        return _letter(bare)
    named = set(_NAMED.findall(reply))
    if len(named) == 1:
        return Verdict(named.pop())
    if _TIE_WORDS.search(reply):
        return Verdict.TIE
    return Verdict.UNPARSED


def outcome(verdict: Verdict, fine_tuned_shown_as: Verdict) -> Outcome:
    """What `verdict` means for the fine-tuned model shown at position `fine_tuned_shown_as`."""
    if verdict in (Verdict.TIE, Verdict.UNPARSED):
        return Outcome.TIE
    return Outcome.WIN if verdict == fine_tuned_shown_as else Outcome.LOSS


def tally(items: Sequence[ItemVerdict]) -> JudgeResult:
    """Count every comparison of `items` into the fine-tuned model's record."""
    comparisons = [c for item in items for c in item.comparisons]
    wins = sum(c.outcome == Outcome.WIN for c in comparisons)
    losses = sum(c.outcome == Outcome.LOSS for c in comparisons)
    ties = len(comparisons) - wins - losses
    return JudgeResult(
        win_rate=(wins + ties / 2) / len(comparisons) if comparisons else None,
        comparisons=len(comparisons), wins=wins, losses=losses, ties=ties,
        unparsed=sum(c.verdict == Verdict.UNPARSED for c in comparisons),
        items=list(items),
    )


def ask_judge(spec: JudgeSpec, api_key: str | None, messages: list[dict[str, str]],
              max_tokens: int = 256, timeout: float = 120.0) -> str:
    """One greedy chat completion from the judge; its reply's text ("" for none)."""
    body = {"model": spec.model, "messages": messages, "max_tokens": max_tokens,
            "temperature": 0}
    headers = {"Content-Type": "application/json"}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    url = f"{spec.endpoint.rstrip('/')}/chat/completions"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            reply: Any = json.load(response)
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")[:500]
        raise JudgeError(f"judge {url}: HTTP {error.code}: {detail}", error.code
                         ) from None
    except (urllib.error.URLError, OSError) as error:
        raise JudgeError(f"judge {url}: {error}") from None
    except ValueError as error:  # not JSON
        # Answered, but not by an OpenAI-compatible API (a web page, say): asking again
        # gets the same page.
        raise JudgeError(f"judge {url}: the reply is not JSON: {error}", 200) from None
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise JudgeError(f"judge {url}: not a chat completion: {str(reply)[:300]}",
                         200) from None
    return str(content or "")


def judge_pairwise(spec: JudgeSpec, api_key: str | None, items: Sequence[JudgeItem], *,
                   max_tokens: int = 256, timeout: float = 120.0) -> JudgeResult:
    """Judge each item in both orders (base as A, then fine-tuned as A) and tally the record."""
    verdicts = []
    for index, item in enumerate(items):
        comparisons = []
        for shown_as, (first, second) in (
            (Verdict.B, (item.base_answer, item.fine_tuned_answer)),
            (Verdict.A, (item.fine_tuned_answer, item.base_answer)),
        ):
            messages = judge_messages(item.prompt, first, second, spec.rubric)
            reply = ask_judge(spec, api_key, messages, max_tokens, timeout)
            verdict = parse_verdict(reply)
            comparisons.append(Comparison(fine_tuned_shown_as=shown_as, reply=reply,
                                          verdict=verdict, outcome=outcome(verdict, shown_as)))
        score = sum({Outcome.WIN: 1.0, Outcome.TIE: 0.5, Outcome.LOSS: 0.0}[c.outcome]
                    for c in comparisons) / len(comparisons)
        verdicts.append(ItemVerdict(index=index, comparisons=comparisons, score=score))
    return tally(verdicts)
