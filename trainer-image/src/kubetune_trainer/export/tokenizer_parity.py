"""The check that the serving tokenizer matches the training tokenizer id for id.

`check_parity` runs transformers' tokenizer and `kubetune_trainer.tokenizer.ServingTokenizer`
over cases chosen to hit every stage of a byte-level BPE tokenizer; the exporter reports
success only when every case agrees.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kubetune_trainer.tokenizer import ServingTokenizer

# Cases chosen to hit every stage of a byte-level BPE tokenizer: pre-tokenizer splits (digits,
# whitespace runs, contractions, punctuation), multi-byte UTF-8 and byte fallback, added and
# special tokens inside text, and an empty string.
PLAIN_TEXTS = (
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "",
    " leading space",
    "trailing space ",
    "a  1",
    "year  2024 and 3.14159, 1,234,567 and 0x1F",
    "  42\n\n\t7   8",
    "tabs\tand\nnewlines\r\nand   runs     of spaces",
    "I'm sure they're fine; we've done it, it'll work, he'd say.",
    "naïve café résumé Straße ÆØÅ",
    "中文测试，日本語のテキスト、한국어 텍스트",  # noqa: RUF001 (full-width commas on purpose)
    "emoji 🎉🙂👍🏽 and flags 🇫🇷 and ZWJ 👩‍💻",
    "math ∑ x² ≤ ∞ ③ ٣ ½",
    "zero\u200bwidth and\u00a0nbsp and\u3000ideographic space",
    "def f(x):\n    return x ** 2  # square\n",
    '{"key": [1, 2, 3], "s": "v"}',
    "<|im_start|>user\nhi<|im_end|>\n",
    "text with <|endoftext|> inside",
    "<repo_name>kubetune<file_sep>main.py",
    "<|im_start|><|im_end|><|im_start|>",
    "not a <|special|> token <|im_start",
)

CONVERSATIONS: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": "What is the capital of France?"},),
    (
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Count: 1  2   3"},
        {"role": "assistant", "content": "1, 2, 3."},
        {"role": "user", "content": "Now in 日本語 🎌"},
    ),
    ({"role": "user", "content": "  spaced\n\nlines\t"},),
)


def training_pipeline(directory: str | Path) -> str | None:
    """The tokenizer.json that transformers actually runs for the model in `directory`, when it
    is not the file's own; None when they are the same (or there is no tokenizer.json).

    transformers 5 takes the tokenizer class from tokenizer_config.json, or, when that names
    only the generic `TokenizersBackend`, from config.json's `model_type`; and some classes
    (`Qwen2Tokenizer`) build their normalizer and pre-tokenizer in code rather than read the
    file's. The same tokenizer files then tokenize differently by architecture: SmolLM2's,
    beside a Qwen2 config, split "a  1" as Qwen's regex does (a,Ġ,Ġ,1) where the file's
    pipeline says a,ĠĠ,1. Training ran the class's pipeline, so that is what must be served.
    """
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        return None
    backend = getattr(AutoTokenizer.from_pretrained(str(directory)), "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer: the parity check says whether it agrees
        return None
    ran = str(backend.to_str())
    return None if ran == Tokenizer.from_file(str(path)).to_str() else ran


def check_parity(training_dir: str | Path, serving: ServingTokenizer,
                 texts: Iterable[str] = ()) -> dict[str, Any]:
    """Compare the training tokenizer (transformers) with the serving one on every case
    (`PLAIN_TEXTS` and `texts`, such as llama.cpp's test vectors for the tokenizer).

    Returns {"ok", "cases", "mismatches": [...]}; the first mismatches carry both id lists so a
    failure says exactly where the tokenizers part.
    """
    from transformers import AutoTokenizer

    training = AutoTokenizer.from_pretrained(str(training_dir))
    mismatches: list[dict[str, Any]] = []
    cases = 0

    def compare(kind: str, source: object, expected: list[int], actual: list[int]) -> None:
        nonlocal cases
        cases += 1
        if expected != actual:
            mismatches.append(
                {"kind": kind, "input": source, "training": expected, "serving": actual}
            )

    for text in (*PLAIN_TEXTS, *texts):
        for special in (True, False):
            expected = list(training(text, add_special_tokens=special)["input_ids"])
            compare(f"encode(special={special})", text, expected, serving.encode(text, special))
        ids = list(training(text, add_special_tokens=False)["input_ids"])
        expected_text = training.decode(ids, skip_special_tokens=True)
        actual_text = serving.decode(ids)
        cases += 1
        if expected_text != actual_text:
            mismatches.append(
                {"kind": "decode", "input": ids, "training": expected_text, "serving": actual_text}
            )
    if training.chat_template:
        for conversation in CONVERSATIONS:
            messages = list(conversation)
            rendered = str(
                training.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            )
            cases += 1
            served = serving.render_chat(messages, True)
            if rendered != served:
                mismatches.append(
                    {
                        "kind": "chat_render",
                        "input": messages,
                        "training": rendered,
                        "serving": served,
                    }
                )
            expected = list(training(rendered, add_special_tokens=False)["input_ids"])
            compare("chat_encode", messages, expected, serving.encode_chat(messages))
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        token = getattr(training, name, None)
        if token:
            compare(
                f"special:{name}",
                token,
                [training.get_vocab()[token]],
                serving.encode(token, add_special_tokens=False),
            )
    return {
        "ok": not mismatches,
        "cases": cases,
        "mismatches": mismatches[:5],
        "mismatchCount": len(mismatches),
    }


def check_genai_tokenizer(model_dir: str | Path, serving: ServingTokenizer) -> dict[str, Any]:
    """How onnxruntime-genai's own tokenizer compares (for the record: the server does not use
    it; on SmolLM2 it differs wherever the Digits pre-tokenizer matters)."""
    import onnxruntime_genai as og

    genai = og.Tokenizer(str(model_dir))
    differing = [
        text
        for text in PLAIN_TEXTS
        if [int(i) for i in genai.encode(text)] != serving.encode(text, add_special_tokens=False)
    ]
    return {"cases": len(PLAIN_TEXTS), "differing": len(differing), "examples": differing[:3]}
