"""Turning checked examples into token ids and loss labels.

Chat records go through the tokenizer's chat template; only the tokens of assistant turns
(including the end-of-turn token, so the model learns to stop) carry labels. Plain records are
`prompt + completion + eos` with labels on the completion and eos. Spans are found on the
rendered text and mapped to tokens with the fast tokenizer's character offsets, so the labels
match exactly the tokens the model sees at serving time.
"""

from __future__ import annotations

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

    @property
    def targets(self) -> int:
        """Tokens that carry loss after the causal shift (the first token never does)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE)


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return str(
        tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    )


def chat_spans(tokenizer: Any, turns: tuple[tuple[str, str], ...]) -> tuple[str, list[range]]:
    """The rendered conversation and the character ranges of its assistant turns."""
    messages = [{"role": role, "content": content} for role, content in turns]
    text = _render(tokenizer, messages, False)
    spans = []
    for index, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        before = _render(tokenizer, messages[:index], True) if index else ""
        through = _render(tokenizer, messages[: index + 1], False)
        # Templates render prefixes identically; if one does not, fall back to the content.
        if not (text.startswith(through) and through.startswith(before)):
            start = text.find(turns[index][1])
            before, through = text[:start], text[: start + len(turns[index][1])]
        spans.append(range(len(before), len(through)))
    return text, spans


def encode(tokenizer: Any, example: Example, max_length: int) -> Encoded:
    """Token ids and labels of one example, truncated to `max_length` tokens."""
    if example.is_chat:
        text, spans = chat_spans(tokenizer, example.messages)
        add_special = False  # the template already has them
    else:
        eos = tokenizer.eos_token or ""
        text = example.prompt + example.completion + eos
        spans = [range(len(example.prompt), len(text))]
        add_special = True
    encoding = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids: list[int] = encoding["input_ids"]
    labels = [
        token if any(start in span for span in spans) else IGNORE
        for token, (start, _end) in zip(ids, encoding["offset_mapping"], strict=True)
    ]
    truncated = len(ids) > max_length
    return Encoded(ids[:max_length], labels[:max_length], truncated)


def encode_prompt(tokenizer: Any, example: Example) -> list[int]:
    """The prompt of an example with a reference answer, ready for greedy generation."""
    if example.is_chat:
        messages = [{"role": r, "content": c} for r, c in example.messages[:-1]]
        text = _render(tokenizer, messages, True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(example.prompt)["input_ids"])
