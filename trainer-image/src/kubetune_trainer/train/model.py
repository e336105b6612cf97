"""Loading the tokenizer and base model and attaching the training method.

`LoRA`/`DoRA` wrap the base in a PEFT adapter (`all-linear` targets every linear layer except
the output head); `QLoRA` loads the base in 4-bit NF4 with bitsandbytes first; `Full` trains
every weight. Weights load in fp32: on GPUs DeepSpeed's bf16 mode casts them, on CPUs fp32
is the precision that trains correctly.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from kubetune.api.dataplane import MODEL_TOKEN_ENV
from kubetune.api.spec import FineTuneJobSpec, Method
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.sources import ModelLocation
from kubetune_trainer.train import attention, lean_lora


def hub_kwargs(location: ModelLocation, spec: FineTuneJobSpec) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": spec.model.trust_remote_code}
    if location.is_hub:
        kwargs["revision"] = location.revision
        kwargs["token"] = os.environ.get(MODEL_TOKEN_ENV) or None
    return kwargs


def load_tokenizer(location: ModelLocation, spec: FineTuneJobSpec) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(location.name_or_path, **hub_kwargs(location, spec))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(compute_dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        # bf16 storage lets ZeRO-3 shard the packed weights on GPUs; CPUs keep uint8.
        bnb_4bit_quant_storage=torch.bfloat16 if compute_dtype == torch.bfloat16 else torch.uint8,
    )


def load_base(
    location: ModelLocation, spec: FineTuneJobSpec, *, quantized: bool = False,
    device: torch.device | None = None,
) -> PreTrainedModel:
    """The base model with KubeTune's padding-free attention; 4-bit NF4 when `quantized`."""
    kwargs = hub_kwargs(location, spec)
    kwargs["attn_implementation"] = attention.choose(device.type if device else "cpu")
    kwargs["dtype"] = torch.float32
    if quantized:
        compute = torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
        kwargs["quantization_config"] = quantization_config(compute)
        kwargs["device_map"] = {"": device or torch.device("cpu")}
    model = AutoModelForCausalLM.from_pretrained(location.name_or_path, **kwargs)
    model.config.use_cache = False
    return model


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The names LoRA can target in this model: each linear layer's own name (`qkv_proj`,
    `gate_proj`, ...), read from its modules, without the output head (as `all-linear`)."""
    output = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if _is_linear(module) and module is not output
    }
    return sorted(names)


def _is_linear(module: torch.nn.Module) -> bool:
    # bitsandbytes' Linear4bit subclasses nn.Linear; PEFT's wrappers are not leaves.
    return isinstance(module, torch.nn.Linear)


def check_target_modules(model: torch.nn.Module, spec: FineTuneJobSpec) -> None:
    """Refuse `lora.targetModules` names the model lacks before anything trains, naming the
    ones it has (PEFT's own error names neither the field nor the choices)."""
    if spec.method is Method.FULL:
        return
    wanted = spec.lora_or_default.target_modules
    if wanted == ["all-linear"]:
        return
    available = linear_module_names(model)
    missing = [name for name in wanted if name not in available]
    if missing:
        raise ConfigError(
            f"spec.lora.targetModules: {', '.join(missing)} not in this model; its linear "
            f"layers are {', '.join(available)} (or use all-linear)"
        )


def lora_config(spec: FineTuneJobSpec) -> Any:
    from peft import LoraConfig

    lora = spec.lora_or_default
    targets: Any = lora.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=float(lora.dropout),
        target_modules=targets,
        use_dora=spec.method is Method.DORA,
        bias="none",
        task_type="CAUSAL_LM",
    )


def prepare(model: PreTrainedModel, spec: FineTuneJobSpec) -> torch.nn.Module:
    """Attach the method: a PEFT adapter, or every weight trainable for `Full`."""
    checkpointing = spec.training.gradient_checkpointing
    if spec.method is Method.FULL:
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    check_target_modules(model, spec)

    if spec.method is Method.QLORA:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
        model.enable_input_require_grads()
    adapted = get_peft_model(model, lora_config(spec))
    # Same result, far less activation memory: see lean_lora.py.
    lean_lora.use_masked_dropout(adapted)
    return adapted


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(all, trainable) parameters; 4-bit weights count as the values they hold."""
    total = trainable = 0
    for param in model.parameters():
        count = param.numel() * (2 if param.dtype == torch.uint8 else 1)
        total += count
        trainable += count if param.requires_grad else 0
    return total, trainable
