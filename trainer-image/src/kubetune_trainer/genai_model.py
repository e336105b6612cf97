"""How onnxruntime-genai's builder lays out an exported decoder, as plain ONNX Runtime sees it:
the model file, the key/value inputs and outputs, their shape and type, the vocabulary, and the
device it was built for with the execution providers that run it there. Read from
`genai_config.json`; shared by the server's engines and the exporter's scoring, which must
run the graph and end an answer alike (the batching engine and the scoring run it without
onnxruntime-genai)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kubetune.api.spec import Device
from kubetune_trainer.errors import ConfigError

if TYPE_CHECKING:
    from kubetune_trainer.tokenizer import ServingTokenizer

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"


class ProviderError(ConfigError):
    """The export was built for a device this installation of ONNX Runtime cannot run on."""


def built_for(model_dir: Path) -> Device:
    """The device the builder built an export for, from genai_config.json: `-e cuda` writes
    `{"cuda": {...}}` into the decoder's `session_options.provider_options` (which
    onnxruntime-genai then runs it on), `-e cpu` writes none. (KubeTune's export.json says the
    same as `device`; genai_config.json is in every builder output, with or without it.)"""
    config = json.loads((model_dir / "genai_config.json").read_text())
    session = config["model"]["decoder"].get("session_options", {})
    named = [name for options in session.get("provider_options", []) for name in options]
    if not named:
        return Device.CPU
    if named == ["cuda"]:
        return Device.CUDA
    raise ProviderError(
        f"{model_dir / 'genai_config.json'}: model.decoder.session_options.provider_options "
        f"names {named}; this server runs exports built for the CPU (none) or CUDA (cuda)"
    )


def execution_providers(device: Device, available: Sequence[str]) -> list[str]:
    """The ONNX Runtime execution providers, in order, for an export built for `device`, given
    what this onnxruntime offers (`onnxruntime.get_available_providers()`). A CUDA export runs
    on CUDA, with the CPU for what CUDA has no kernel for (as ONNX Runtime places nodes); it
    never falls back to the CPU as a whole: a model built and sized for a GPU would serve at a
    fraction of its speed while the pod holds the GPU."""
    if device is Device.CPU:
        return [CPU_PROVIDER]
    if CUDA_PROVIDER not in available:
        raise ProviderError(
            f"this export was built for CUDA but onnxruntime has no {CUDA_PROVIDER}: install "
            "onnxruntime-gpu (the trainer image built with TORCH_VARIANT=cuda has it; this "
            f"onnxruntime offers {', '.join(available) or 'no provider'})"
        )
    return [CUDA_PROVIDER, CPU_PROVIDER]


def check_session_providers(session: Any, wanted: Sequence[str]) -> None:
    """ONNX Runtime drops a provider that fails to start (no GPU visible, a CUDA library
    missing) with a warning and runs on the rest: refuse that instead of serving a CUDA export
    on the CPU."""
    running = list(session.get_providers())
    if wanted[0] not in running:
        raise ProviderError(
            f"onnxruntime could not start {wanted[0]} (the session runs on "
            f"{', '.join(running)}): the pod needs a GPU (serving.resources.gpus) and the CUDA "
            "libraries onnxruntime-gpu was built for; its log above says which failed"
        )


@dataclass(frozen=True)
class DecoderLayout:
    model_file: Path
    kv_names: list[str]
    """`past_key_values.{layer}.key|value`, layer by layer."""
    output_names: list[str]
    """`logits`, then `present.{layer}.key|value` in `kv_names`' order."""
    kv_shape: tuple[int, int]
    """(key/value heads, head size)."""
    vocab: int
    device: Device = Device.CPU
    """What the builder built it for (`built_for`)."""

    @classmethod
    def read(cls, model_dir: Path) -> DecoderLayout:
        model = json.loads((model_dir / "genai_config.json").read_text())["model"]
        config = model["decoder"]
        layers = int(config["num_hidden_layers"])
        kv_names = [f"past_key_values.{layer}.{part}" for layer in range(layers)
                    for part in ("key", "value")]
        return cls(
            model_file=model_dir / config["filename"],
            kv_names=kv_names,
            output_names=["logits"] + [n.replace("past_key_values", "present")
                                       for n in kv_names],
            kv_shape=(int(config["num_key_value_heads"]), int(config["head_size"])),
            vocab=int(model["vocab_size"]),
            device=built_for(model_dir),
        )

    def session(self) -> Any:
        """An ONNX Runtime CPU session: its defaults measured fastest here (one intra-op
        thread per core, spinning; bench/RESULTS.md)."""
        import onnxruntime as ort

        return ort.InferenceSession(str(self.model_file), providers=["CPUExecutionProvider"])


def kv_dtype(session: Any) -> type[np.generic]:
    """The key/value cache's element type, as the session's inputs declare it."""
    kv_type = next(i.type for i in session.get_inputs() if i.name.startswith("past"))
    return np.float16 if "float16" in kv_type else np.float32


def end_of_turn_ids(model_dir: Path) -> frozenset[int]:
    """The ids genai_config.json ends a generation with (`eos_token_id`, one or a list): the
    builder writes generation_config.json's, which for a chat model are all its end-of-turn
    tokens (Llama 3: <|end_of_text|> and <|eot_id|>; Phi-3: <|endoftext|>, <|assistant|> and
    <|end|>), with the tokenizer's `eos_token` added when they lack it."""
    listed = json.loads((model_dir / "genai_config.json").read_text())["model"].get(
        "eos_token_id"
    )
    if listed is None:
        return frozenset()
    return frozenset(int(i) for i in (listed if isinstance(listed, list) else [listed]))


def stop_token_ids(model_dir: Path, tokenizer: ServingTokenizer) -> frozenset[int]:
    """The tokens that end an answer: genai_config.json's `eos_token_id` (`end_of_turn_ids`)
    and the tokenizer's `eos_token`.

    A chat model ends its turn with a token that is often not the tokenizer's `eos_token`
    alone (Llama 3: <|end_of_text|> and <|eot_id|>; Phi-3: <|endoftext|>, <|assistant|> and
    <|end|>; Qwen: <|im_end|> and <|endoftext|>; Gemma: </s> and <end_of_turn>). Stopping on
    one of them only would let the model write the next turns itself.
    """
    ids = set(end_of_turn_ids(model_dir))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
