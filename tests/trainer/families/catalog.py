"""The model families users bring, as tiny random-weight models with their real tokenizers.

No weights are downloaded. Each family's model is built here from its transformers config class
with a few small layers, so a test exercises that family's structure (packed projections,
biases, q/k norms, soft-capping, sliding windows, partial rotary, LongRoPE) in seconds. The
tokenizers are real: llama.cpp ships vocab-only GGUF files of the families' tokenizers, with
tokenization test vectors (`.inp`/`.out`), in PyPI's `llama-cpp-python` sdist. The first use
downloads that sdist with pip into the cache (as `make test` does the control plane's
binaries), keeps only the vocab files, and converts each tokenizer once with transformers.

Where llama.cpp has no vocab for a family, the closest real tokenizer stands in and `Family.
tokenizer_note` says so. Chat templates come from the GGUF where it carries the family's own;
otherwise from `templates/`, the family's published template without its tool-calling parts.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api.dataplane import cache_root

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
TEMPLATES = Path(__file__).parent / "templates"
# Bumped when the conversion below changes what it writes.
TOKENIZER_FORMAT = 2

TINY: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 4096}


@dataclass(frozen=True)
class Family:
    """One model family: its config, its tokenizer and how its chat turns end."""

    name: str
    vocab: str  # llama.cpp's vocab file: ggml-vocab-{vocab}.gguf
    config: Callable[[int], Any]  # vocabulary size -> a transformers config
    template: str | None = None  # templates/{template}.jinja; None: the GGUF's own
    eos_token: str | None = None  # the instruct model's eos, when it is not the GGUF's
    end_of_turn: tuple[str, ...] = ()  # generation_config's eos ids, by token
    added_tokens: tuple[str, ...] = ()  # special tokens the stand-in tokenizer lacks
    tokenizer_note: str = ""
    drops_system: bool = False  # its template leaves a system message out of the rendered text
    traits: tuple[str, ...] = field(default_factory=tuple)


def _llama(vocab: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, **TINY)


def _mistral(vocab: int) -> Any:
    from transformers import MistralConfig

    return MistralConfig(vocab_size=vocab, sliding_window=4096, **TINY)


def _phi3(vocab: int) -> Any:
    from transformers import Phi3Config

    tiny = {k: v for k, v in TINY.items() if k != "head_dim"}
    return Phi3Config(vocab_size=vocab, pad_token_id=32000, bos_token_id=1, eos_token_id=32000,
                      **tiny)


def _phi3_128k(vocab: int) -> Any:
    """Phi-3-mini-128k / Phi-3.5-mini: LongRoPE, written as their config.json writes it."""
    from transformers import Phi3Config

    half = 16 // 2  # one factor per rotary frequency: head_dim / 2
    tiny = {k: v for k, v in TINY.items() if k not in ("head_dim", "max_position_embeddings")}
    return Phi3Config(
        vocab_size=vocab, pad_token_id=32000, bos_token_id=1, eos_token_id=32000,
        max_position_embeddings=131072, original_max_position_embeddings=4096,
        rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(half)],
                      "long_factor": [1.0 + 0.9 * i for i in range(half)]},
        **tiny)


def _phi4_mini(vocab: int) -> Any:
    """Partial rotary (0.75) and tied embeddings. Heads 64 wide, as ONNX Runtime's attention
    needs the rotary part to be a multiple of 16 (released Phi-4-mini: 96 of 128)."""
    from transformers import Phi3Config

    tiny = {k: v for k, v in TINY.items()
            if k not in ("head_dim", "hidden_size", "num_attention_heads", "num_key_value_heads")}
    return Phi3Config(vocab_size=vocab, partial_rotary_factor=0.75, tie_word_embeddings=True,
                      hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                      pad_token_id=32000, bos_token_id=1, eos_token_id=32000, **tiny)


def _qwen2(vocab: int) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab, tie_word_embeddings=True, **TINY)


WIDE_HEADS = {**TINY, "head_dim": 32}
"""Attention wider than the hidden size (4 heads x 32 = 128 > 64), as the released Qwen3 and
Gemma models have it (Qwen3-0.6B: 16 x 128 = 2048 over 1024; Gemma 3 1B: 4 x 256 = 1024 over
1152, narrower): q_proj's output and o_proj's input are not hidden_size wide."""


def _qwen3(vocab: int) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab, tie_word_embeddings=True, **WIDE_HEADS)


def _gemma2(vocab: int) -> Any:
    from transformers import Gemma2Config

    return Gemma2Config(vocab_size=vocab, sliding_window=4096, query_pre_attn_scalar=16,
                        attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                        **TINY)


def _gemma3(vocab: int) -> Any:
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(vocab_size=vocab, sliding_window=512, query_pre_attn_scalar=32,
                            layer_types=["sliding_attention", "full_attention"],
                            **WIDE_HEADS)


GEMMA_NOTE = ("llama.cpp's Gemma vocab is Gemma 4's (262,144 tokens, the SentencePiece-style BPE "
              "with byte fallback of Gemma 2 and 3); transformers cannot read that file, so it "
              "is rebuilt from the GGUF's tokens and merges (matching all of llama.cpp's test "
              "vectors), with Gemma 2/3's turn tokens added")
GEMMA_TURNS = ("<start_of_turn>", "<end_of_turn>")
PHI4_NOTE = ("Phi-4-mini's 200k tiktoken-style vocabulary is not in llama.cpp's vocab files; "
             "Phi-3's tokenizer, which has the same <|user|>/<|assistant|>/<|end|> markup, "
             "stands in")

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama3", "llama-bpe", _llama, "llama3", eos_token="<|eot_id|>",
           end_of_turn=("<|end_of_text|>", "<|eot_id|>"), traits=("tiktoken-style BPE",)),
    Family("llama2", "llama-spm", _llama, "llama2", traits=("SentencePiece",)),
    # v0.3's template writes the system message into the last user turn only, so a record
    # that ends with the answer trains without it.
    Family("mistral", "llama-spm", _mistral, "mistral", traits=("sliding window",),
           drops_system=True,
           tokenizer_note="Mistral 7B v0.1's vocab is Llama 2's SentencePiece (32000)"),
    Family("phi3", "phi-3", _phi3, end_of_turn=("<|endoftext|>", "<|assistant|>", "<|end|>"),
           drops_system=True,
           traits=("packed qkv_proj", "packed gate_up_proj", "no system turn")),
    Family("phi3-128k", "phi-3", _phi3_128k,
           end_of_turn=("<|endoftext|>", "<|assistant|>", "<|end|>"), drops_system=True,
           traits=("LongRoPE",)),
    Family("phi4-mini", "phi-3", _phi4_mini, "phi4", eos_token="<|endoftext|>",
           end_of_turn=("<|endoftext|>", "<|end|>"), tokenizer_note=PHI4_NOTE,
           traits=("partial rotary", "tied embeddings")),
    Family("qwen2", "qwen2", _qwen2, eos_token="<|im_end|>",
           end_of_turn=("<|im_end|>", "<|endoftext|>"), traits=("q/k/v bias", "ChatML")),
    Family("qwen3", "qwen35", _qwen3, "qwen3", eos_token="<|im_end|>",
           end_of_turn=("<|im_end|>", "<|endoftext|>"),
           traits=("q/k norm", "thinking template", "heads wider than hidden"),
           tokenizer_note="llama.cpp's qwen35 vocab: Qwen's 151,936-token BPE"),
    Family("gemma2", "gemma-4", _gemma2, "gemma", eos_token="<end_of_turn>",
           end_of_turn=("</s>", "<end_of_turn>"), added_tokens=GEMMA_TURNS,
           tokenizer_note=GEMMA_NOTE,
           traits=("soft-capping", "sliding window", "scaled embeddings")),
    Family("gemma3", "gemma-4", _gemma3, "gemma", eos_token="<end_of_turn>",
           end_of_turn=("</s>", "<end_of_turn>"), added_tokens=GEMMA_TURNS,
           tokenizer_note=GEMMA_NOTE,
           traits=("q/k norm", "sliding window", "scaled embeddings", "heads wider than hidden")),
)}


def _locked(path: Path) -> Any:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path.with_name(path.name + ".lock"), "w")  # noqa: SIM115 (held by caller)
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def vocab_dir() -> Path:
    """llama.cpp's vocab files (`ggml-vocab-*.gguf` and test vectors), fetched once."""
    target = cache_root() / "vocab" / LLAMA_CPP_PYTHON.replace("==", "-")
    with _locked(target):
        if (target / "ggml-vocab-phi-3.gguf").is_file():
            return target
        with tempfile.TemporaryDirectory() as download:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                            ":all:", "-d", download, LLAMA_CPP_PYTHON], check=True,
                           capture_output=True, timeout=900)
            archive = next(Path(download).glob("*.tar.gz"))
            staging = Path(tempfile.mkdtemp(dir=target.parent))
            with tarfile.open(archive) as tar:
                for member in tar.getmembers():
                    name = member.name.rsplit("/", 1)[-1]
                    if "/models/ggml-vocab-" in member.name and member.isfile():
                        extracted = tar.extractfile(member)
                        assert extracted is not None
                        (staging / name).write_bytes(extracted.read())
            staging.chmod(0o755)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
    return target


def test_vectors(vocab: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenization test vectors for a vocab: (text, ids without specials)."""
    base = vocab_dir() / f"ggml-vocab-{vocab}.gguf"
    texts = base.with_suffix(".gguf.inp").read_text(encoding="utf-8").split(
        "\n__ggml_vocab_test__\n")
    ids = base.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, ids, strict=False)]


SENTENCEPIECE_BPE = ("gemma-4",)
"""Vocab files transformers cannot load (it reads Gemma 4's as a model config and fails) that
are SentencePiece-style BPE: tokens and merges in the GGUF, spaces as `▁`, bytes as fallback."""


def sentencepiece_bpe(path: Path) -> Any:
    """A fast tokenizer from a GGUF's `tokenizer.ggml.*` fields, built as SentencePiece's BPE
    models tokenize: no pre-tokenizer, spaces replaced by `▁`, unknown bytes as <0xNN>."""
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    fields = GGUFReader(path).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    kinds = fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(merge.split(" ", 1)) for merge in fields["tokenizer.ggml.merges"].contents()]

    def token(key: str) -> str:
        return str(tokens[fields[f"tokenizer.ggml.{key}_token_id"].contents()])

    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                   byte_fallback=True, fuse_unk=True, unk_token=token("unknown")))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse()])
    control, user_defined = 3, 4  # llama.cpp's token types
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, kinds, strict=True)
                                if kind in (control, user_defined)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=token("bos"), eos_token=token("eos"),
        unk_token=token("unknown"), pad_token=token("padding"))


def tokenizer_dir(family: Family) -> Path:
    """The family's tokenizer as tokenizer.json + tokenizer_config.json (converted once)."""
    target = cache_root() / "vocab" / "tokenizers" / f"{family.name}-{TOKENIZER_FORMAT}"
    with _locked(target):
        if (target / "tokenizer.json").is_file():
            return target
        from transformers import AutoTokenizer

        gguf = f"ggml-vocab-{family.vocab}.gguf"
        if family.vocab in SENTENCEPIECE_BPE:
            tokenizer = sentencepiece_bpe(vocab_dir() / gguf)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(vocab_dir()), gguf_file=gguf)
        if family.added_tokens:
            tokenizer.add_special_tokens({"additional_special_tokens": list(family.added_tokens)})
        if family.eos_token:
            tokenizer.eos_token = family.eos_token
        if family.template:
            tokenizer.chat_template = (TEMPLATES / f"{family.template}.jinja").read_text()
        staging = Path(tempfile.mkdtemp(dir=target.parent))
        tokenizer.save_pretrained(str(staging))
        staging.chmod(0o755)
        staging.rename(target)
    return target


def build_tiny_model(family: Family, directory: Path, seed: int = 0) -> Path:
    """A random-weight model of the family with its tokenizer, saved as a transformers dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir(family)))
    config = family.config(len(tokenizer))
    config.bos_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    ends = [tokenizer.convert_tokens_to_ids(token) for token in family.end_of_turn]
    eos = ends or [tokenizer.eos_token_id]
    model.config.eos_token_id = eos[0] if len(eos) == 1 else eos
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0])
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def describe(directory: Path) -> dict[str, Any]:
    return dict(json.loads((directory / "config.json").read_text()))


if __name__ == "__main__":  # python -m tests.trainer.families.catalog OUT: build every family
    root = Path(sys.argv[1])
    for family in FAMILIES.values():
        print(family.name, build_tiny_model(family, root / family.name), flush=True)
    os._exit(0)
