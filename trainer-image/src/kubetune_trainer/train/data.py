"""Reading and checking JSONL datasets, before any model is loaded.

Formats (one JSON object per line; blank lines are skipped):
- `Chat`: `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}` with
  at least one assistant turn. The loss covers the assistant turns.
- `Instruction`: `{"instruction": "...", "input": "..." (optional), "output": "..."}`, turned
  into a user turn and an assistant turn. The loss covers the output.
- `Completion`: `{"prompt": "...", "completion": "..."}`, plain text. The loss covers the
  completion.
- `Text`: `{"text": "..."}`. The loss covers everything.
- `Auto` picks the format from the first record's keys.

Every problem raises `DatasetError` naming the file, the 1-based line number and what is wrong.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api.dataplane import JsonlError, read_jsonl
from kubetune_trainer.errors import DatasetError

FORMATS = ("Chat", "Instruction", "Completion", "Text")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    """One checked record, normalised: chat `messages`, or plain `prompt` + `completion`."""

    line: int
    messages: tuple[tuple[str, str], ...] = ()
    """(role, content) pairs for Chat and Instruction records."""
    prompt: str = ""
    """Plain-text prefix without loss (Completion); empty for Text."""
    completion: str = ""
    """Plain-text part with loss (Completion, Text)."""

    @property
    def is_chat(self) -> bool:
        return bool(self.messages)

    @property
    def reference(self) -> str | None:
        """The answer exact-match accuracy compares against: the last assistant turn or the
        completion; None for Text records, which carry no answer."""
        if self.messages:
            return self.messages[-1][1] if self.messages[-1][0] == "assistant" else None
        return self.completion if self.prompt else None


def detect_format(record: dict[str, Any]) -> str | None:
    """The format a record's keys suggest, or None."""
    if "messages" in record:
        return "Chat"
    if "instruction" in record or "output" in record:
        return "Instruction"
    if "prompt" in record or "completion" in record:
        return "Completion"
    if "text" in record:
        return "Text"
    return None


def _string(record: dict[str, Any], key: str, *, required: bool = True) -> str:
    if key not in record:
        if required:
            raise ValueError(f'missing key "{key}"')
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f'"{key}" must be a string, got {type(value).__name__}')
    return value


def _chat(record: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    if "messages" not in record:
        raise ValueError('missing key "messages"')
    messages = record["messages"]
    if not isinstance(messages, list):
        raise ValueError(f'"messages" must be a list, got {type(messages).__name__}')
    if not messages:
        raise ValueError('"messages" is empty')
    turns = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be an object, got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str):
            raise ValueError(f'{where} needs a string "role"')
        if role not in ROLES:
            raise ValueError(f"{where} has unknown role {role!r} (expected {', '.join(ROLES)})")
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(f'{where} needs a string "content"')
        turns.append((role, content))
    if not any(role == "assistant" for role, _ in turns):
        raise ValueError("no assistant message: nothing to learn from")
    return tuple(turns)


def parse_record(record: Any, fmt: str, line: int) -> Example:
    """Check one decoded record against `fmt` and normalise it (raises ValueError)."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if fmt == "Chat":
        return Example(line, messages=_chat(record))
    if fmt == "Instruction":
        instruction = _string(record, "instruction")
        extra = _string(record, "input", required=False)
        output = _string(record, "output")
        if not instruction.strip():
            raise ValueError('"instruction" is empty')
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Example(line, messages=(("user", user), ("assistant", output)))
    if fmt == "Completion":
        prompt, completion = _string(record, "prompt"), _string(record, "completion")
        if not completion:
            raise ValueError('"completion" is empty')
        return Example(line, prompt=prompt, completion=completion)
    if fmt == "Text":
        text = _string(record, "text")
        if not text:
            raise ValueError('"text" is empty')
        return Example(line, completion=text)
    raise ValueError(f"unknown format {fmt!r}")


def load_examples(path: Path, fmt: str = "Auto") -> tuple[str, list[Example]]:
    """All records of a JSONL file, checked; returns the (detected) format and the examples.
    Lines are split and decoded by `kubetune.api.dataplane.read_jsonl` (at "\n" only)."""
    name = str(path)
    examples: list[Example] = []
    try:
        for number, record in read_jsonl(path):
            if fmt == "Auto":
                detected = detect_format(record) if isinstance(record, dict) else None
                if detected is None:
                    raise DatasetError(
                        name,
                        number,
                        "cannot detect the format: expected a messages, instruction/output, "
                        "prompt/completion or text key",
                    )
                fmt = detected
            try:
                examples.append(parse_record(record, fmt, number))
            except ValueError as error:
                raise DatasetError(name, number, f"{error} (format {fmt})") from error
    except JsonlError as error:
        raise DatasetError(error.path, error.line, error.problem) from None
    if not examples:
        raise DatasetError(name, None, "contains no records")
    return fmt, examples


def split_validation(
    examples: list[Example], percent: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """Hold out `percent` % of the records (at least one, never all), chosen by `seed`."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    count = min(max(1, len(examples) * percent // 100), len(examples) - 1)
    held = set(order[:count])
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [e for i, e in enumerate(examples) if i in held]
