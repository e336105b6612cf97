"""Structured output: a request's `response_format` compiled to a grammar, and the constraint
that keeps a sequence's tokens inside it, one step at a time, in either engine.

The grammar engine is llguidance: xgrammar, the other maintained one, needs torch, which the
server image does not carry; llguidance is one abi3 wheel with a numpy interface, computes a
token mask in microseconds once a sequence is under way, and its JSON-schema compiler says what
it does not support in a message that becomes the client's 400.

`grammar_for` is pure (the parser and the published schema both call it, so they agree on what
is refused); `Grammars` holds what a loaded model adds (its tokenizer and vocabulary width) and
makes one `Constraint` per constrained sequence.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import llguidance
import numpy as np

from kubetune_trainer.serve.protocol import RequestError

# Compact JSON: with flexible whitespace a small model can emit newlines and spaces until
# `max_tokens` instead of closing the object.
COMPILE_OPTIONS: Any = {"whitespace_flexible": False}
ANY_OBJECT = {"type": "object"}


def _refuse(message: str, param: str = "response_format") -> RequestError:
    return RequestError(400, message, param=param, code="invalid_value")


def _schema_of(response_format: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema a `response_format` asks for; None for free text."""
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ANY_OBJECT
    if kind != "json_schema":
        raise _refuse(
            "'response_format.type' must be one of text, json_object, json_schema",
            "response_format.type",
        )
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise _refuse(
            "'response_format.json_schema' must be an object with a string 'name' and a 'schema'",
            "response_format.json_schema",
        )
    schema = spec.get("schema", {})  # OpenAI's default: no constraint beyond valid JSON
    if not isinstance(schema, dict):
        raise _refuse(
            "'response_format.json_schema.schema' must be a JSON schema object",
            "response_format.json_schema.schema",
        )
    return schema


def grammar_for(response_format: Any) -> str | None:
    """The llguidance grammar that `response_format` asks for, or None for free text.

    `RequestError` (400) when it is malformed or its schema uses what llguidance does not
    support, with llguidance's own message (it names the keyword).
    """
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise _refuse("'response_format' must be an object")
    schema = _schema_of(response_format)
    if schema is None:
        return None
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=COMPILE_OPTIONS)
    except (ValueError, TypeError) as error:
        raise _refuse(f"the JSON schema cannot be used: {error}") from None
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem and not problem.startswith("WARNING"):
        raise RequestError(
            400,
            f"the JSON schema is not supported: {problem}",
            param="response_format.json_schema.schema",
            code="unsupported_schema",
        )
    return grammar


class ConstraintError(Exception):
    """The grammar engine failed mid-sequence (a limit it hit): that sequence fails, alone."""


class Constraint:
    """One sequence's grammar state: masks each step's logits, then consumes the chosen token."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab: int) -> None:
        self.matcher = matcher
        self.vocab = vocab
        self.bitmask = np.full((vocab + 31) // 32, -1, dtype=np.int32)

    def mask(self, logits: np.ndarray) -> None:
        """Set every token the grammar does not allow next to -inf, in place."""
        self.matcher.unsafe_compute_mask_ptr(self.bitmask.ctypes.data, self.bitmask.nbytes)
        allowed = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little")[: self.vocab]
        logits[allowed == 0] = -np.inf
        self._check()

    def advance(self, token: int) -> None:
        self.matcher.consume_token(token)
        self._check()

    @property
    def complete(self) -> bool:
        """The grammar admits nothing more: the answer is whole (end of sequence is next)."""
        return bool(self.matcher.is_stopped())

    def _check(self) -> None:
        if self.matcher.is_error():
            raise ConstraintError(f"constrained decoding failed: {self.matcher.get_error()}")


class Grammars:
    """What constrained decoding needs from the loaded model: its tokenizer as llguidance reads
    it, with the model's vocabulary width (the logits' columns) and end-of-sequence token."""

    def __init__(self, tokenizer_json: Path, vocab: int, eos: int | None) -> None:
        self.vocab = vocab
        self.tokenizer = llguidance.LLTokenizer(str(tokenizer_json), n_vocab=vocab, eos_token=eos)

    @classmethod
    def of_model(cls, model_dir: Path, eos: int | None) -> Grammars:
        """For an exported model directory (the GenAI builder's layout)."""
        config = json.loads((model_dir / "genai_config.json").read_text())["model"]
        return cls(model_dir / "tokenizer.json", int(config["vocab_size"]), eos)

    def spell(self, token: int) -> bytes:
        """A token's bytes (for `logprobs`: a token may end inside a UTF-8 character)."""
        return bytes(self.tokenizer.decode_bytes([token]))

    def constraint(self, grammar: str | None) -> Constraint | None:
        if grammar is None:
            return None
        return Constraint(llguidance.LLMatcher(self.tokenizer, grammar), self.vocab)
