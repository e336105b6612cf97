"""The serving tokenizer: the training tokenizer's ids, without transformers.

The server does not use onnxruntime-genai's own tokenizer. That tokenizer re-implements
tokenizer.json's pre-tokenizers and quietly ignores ones it does not know: it drops SmolLM2's
`Digits(individual_digits)` step, so "a  1" becomes a,Ġ,Ġ,1 where training saw a,ĠĠ,1 (see
GGUF_PRE_TOKENIZERS in builtin.py for how the GGUF conversion lost that step in the first place).
`ServingTokenizer` runs the same Rust `tokenizers` library as transformers' fast tokenizer, from
the same tokenizer.json, and renders the chat template the way transformers does. The exporter
proves the equivalence (`kubetune_trainer.export.tokenizer_parity`) before it reports success,
and the server goes through exactly these methods, so what is checked is what is served.
A shared leaf: imported by `export` and `serve`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _render_template(template: str, **context: Any) -> str:
    """Render a chat template with the Jinja settings transformers uses."""
    from jinja2 import ext
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols]
    )
    env.filters["tojson"] = lambda value, indent=None: json.dumps(
        value, ensure_ascii=False, indent=indent
    )
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(**context)


@dataclass
class ServingTokenizer:
    """Encode, decode and chat-render for the server, from an exported model directory."""

    directory: Path
    backend: Any = field(repr=False)
    chat_template: str | None
    special_tokens: dict[str, str]
    special_ids: frozenset[int]

    @classmethod
    def load(cls, directory: str | Path) -> ServingTokenizer:
        from tokenizers import Tokenizer

        directory = Path(directory)
        backend = Tokenizer.from_file(str(directory / "tokenizer.json"))
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template_path = directory / "chat_template.jinja"
        template = (
            template_path.read_text(encoding="utf-8")
            if template_path.is_file()
            else config.get("chat_template")
        )
        specials = {
            name: value
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
            if isinstance(value := config.get(name), str)
        }
        special_ids = frozenset(
            token_id
            for token_id, token in backend.get_added_tokens_decoder().items()
            if token.special
        )
        return cls(directory, backend, template, specials, special_ids)

    @property
    def eos_token_id(self) -> int | None:
        eos = self.special_tokens.get("eos_token")
        return None if eos is None else self.backend.token_to_id(eos)

    @property
    def vocab_size(self) -> int:
        """Ids `decode` knows: the vocabulary and the added (special) tokens."""
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Iterable[int]) -> str:
        return str(self.backend.decode(list(ids), skip_special_tokens=True))

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if not self.chat_template:
            raise ValueError("this model has no chat template; use /v1/completions")
        return _render_template(
            self.chat_template,
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
        )

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt ids for a conversation, as training encodes it: render, then no extra specials."""
        return self.encode(self.render_chat(messages, True), add_special_tokens=False)
