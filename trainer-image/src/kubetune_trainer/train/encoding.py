"""Turning checked examples into token ids and loss labels.

Chat records go through the tokenizer's chat template; only the tokens of assistant turns
(including the end-of-turn token, so the model learns to stop) carry labels. Plain records are
`prompt + completion + eos` with labels on the completion and eos. Spans are found on the
rendered text and mapped to tokens with the fast tokenizer's character offsets, so the labels
match exactly the tokens the model sees at serving time.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from kubetune_trainer.heldout import IGNORE
from kubetune_trainer.train.data import Example


@dataclass(frozen=True)
class Encoded:
    """One tokenised record: `labels[i]` is the target for position i, or -100 (no loss)."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool
    system_dropped: bool = False
    """The chat template left this record's system message out of the text the model sees."""

    @property
    def targets(self) -> int:
        """Tokens that carry loss after the causal shift (the first token never does)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE)


class UnlabelledTurn(ValueError):
    """The chat template rewrites an assistant turn, so its tokens cannot be found to label."""

    def __init__(self, turn: int, content: str) -> None:
        shown = content if len(content) <= 60 else content[:57] + "..."
        super().__init__(
            f"the model's chat template rewrites assistant turn {turn} ({shown!r}): its text is "
            "not in the rendered conversation, so its tokens cannot be labelled (a reasoning "
            "template drops <think> blocks of earlier turns; put reasoning only in the last "
            "turn, or train on a template that keeps it)"
        )


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return str(
        tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    )


_PROBE = "\u2063kubetune-end-of-turn-probe\u2063"


def end_of_turn(tokenizer: Any) -> str:
    """What the template writes right after any assistant turn's text (`<|im_end|>\\n`,
    `<|end|>`, `<end_of_turn>\\n`, `<|eot_id|>`, `</s>`): the tokens that follow a probe
    answer both at the end of a conversation and before another user turn."""
    cached = getattr(tokenizer, "_kubetune_end_of_turn", None)
    if cached is not None:
        return str(cached)
    turns = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _PROBE}]
    last = _render(tokenizer, turns, False).partition(_PROBE)[2]
    middle = _render(tokenizer, [*turns, {"role": "user", "content": "y"}], False)
    middle = middle.partition(_PROBE)[2]
    last_ids = tokenizer(last, add_special_tokens=False, return_offsets_mapping=True)
    middle_ids = tokenizer(middle, add_special_tokens=False)["input_ids"]
    common = 0
    for a, b in zip(last_ids["input_ids"], middle_ids, strict=False):
        if a != b:
            break
        common += 1
    ending = last[: last_ids["offset_mapping"][common - 1][1]] if common else ""
    with contextlib.suppress(AttributeError):  # one that refuses attributes probes again
        tokenizer._kubetune_end_of_turn = ending
    return ending


def chat_spans(tokenizer: Any, turns: tuple[tuple[str, str], ...]) -> tuple[str, list[range]]:
    """The rendered conversation and the character ranges of its assistant turns, each with
    the end-of-turn text the template writes after it (so the model learns to stop).

    Templates that render every prefix identically give exact spans from the prefixes. Some
    do not (Mistral's moves the system message to the last user turn; Qwen 3's writes an
    empty think block into the last answer only): then the turn is the first place after the
    previous turn where its text appears, plus the template's end-of-turn text. A turn whose
    text is not there at all is refused (`UnlabelledTurn`), never silently left unlabelled.
    """
    messages = [{"role": role, "content": content} for role, content in turns]
    text = _render(tokenizer, messages, False)
    spans: list[range] = []
    cursor = 0
    for index, (role, content) in enumerate(turns):
        if role != "assistant":
            continue
        before = _render(tokenizer, messages[:index], True) if index else ""
        through = _render(tokenizer, messages[: index + 1], False)
        if text.startswith(through) and through.startswith(before) and len(before) >= cursor:
            span = range(len(before), len(through))
        else:
            span = _found_span(text, content, cursor, end_of_turn(tokenizer), index)
        spans.append(span)
        cursor = span.stop
    return text, spans


def _found_span(text: str, content: str, cursor: int, ending: str, turn: int) -> range:
    stripped = content.strip()  # templates often trim a turn
    start = text.find(stripped, cursor) if stripped else -1
    if start < 0:
        raise UnlabelledTurn(turn, content)
    stop = start + len(stripped)
    if ending and text.startswith(ending, stop):
        stop += len(ending)
    return range(start, stop)


def system_dropped(text: str, turns: tuple[tuple[str, str], ...]) -> bool:
    """True when a system message's text is missing from the rendered conversation (Phi-3's
    template has no system turn and leaves it out)."""
    return any(role == "system" and content.strip() and content.strip() not in text
               for role, content in turns)


def encode(tokenizer: Any, example: Example, max_length: int) -> Encoded:
    """Token ids and labels of one example, truncated to `max_length` tokens (raises
    `UnlabelledTurn` when the chat template rewrites an assistant turn)."""
    dropped = False
    if example.is_chat:
        text, spans = chat_spans(tokenizer, example.messages)
        dropped = system_dropped(text, example.messages)
        add_special = False  # the template already has them
    else:
        eos = tokenizer.eos_token or ""
        text = example.prompt + example.completion + eos
        spans = [range(len(example.prompt), len(text))]
        add_special = True
    encoding = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids: list[int] = encoding["input_ids"]
    # A token that overlaps a span is the answer's: SentencePiece glues the space before an
    # answer to its first word ("▁kubectl" starts at the space the template writes).
    labels = [
        token if any(start < span.stop and end > span.start for span in spans) else IGNORE
        for token, (start, end) in zip(ids, encoding["offset_mapping"], strict=True)
    ]
    truncated = len(ids) > max_length
    return Encoded(ids[:max_length], labels[:max_length], truncated, dropped)


def encode_prompt(tokenizer: Any, example: Example) -> list[int]:
    """The prompt of an example with a reference answer, ready for greedy generation."""
    if example.is_chat:
        messages = [{"role": r, "content": c} for r, c in example.messages[:-1]]
        text = _render(tokenizer, messages, True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(example.prompt)["input_ids"])
