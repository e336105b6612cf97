"""The optimizer step, with plain PyTorch or with DeepSpeed ZeRO.

Both steppers take micro-batches whose loss is already normalised by the step's target tokens
over all ranks (so every token weighs the same, however the records were split), accumulate
gradients, and apply one clipped AdamW update per `step()`. DeepSpeed runs in unmanaged
accumulation mode: a step may hold a different number of micro-batches than the config's
nominal accumulation, since micro-batches are cut by tokens, not by records.

Plain PyTorch is used for one process with ZeRO stage 0 (the common single-GPU LoRA case and
local runs on a CPU): it is the same computation without DeepSpeed's bookkeeping.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from kubetune.api.spec import LrScheduler, TrainingSpec
from kubetune_trainer.train import chunked_loss
from kubetune_trainer.train.encoding import IGNORE


def plain_causal_lm(model: torch.nn.Module) -> PreTrainedModel | None:
    """The transformers model inside `model` (itself, or under a PEFT adapter) when its head
    can run in chunks; None under DeepSpeed, whose engine must run the whole forward."""
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    if isinstance(inner, PreTrainedModel) and chunked_loss.supports(inner):
        return inner
    return None


def token_loss_sum(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Summed cross-entropy over the target tokens; the output head runs on those only.

    Computing logits just where a label exists skips most of the [tokens x vocab] product
    and its fp32 memory (49k vocab x every prompt token for SmolLM2); `chunked_loss` then
    never holds more than a chunk of those logits at once."""
    targets = batch["targets"]
    keep = (targets != IGNORE).any(dim=0).nonzero().squeeze(-1)
    inputs = {k: v for k, v in batch.items() if k != "targets"}
    causal = plain_causal_lm(model)
    if causal is not None:
        hidden = causal.get_decoder()(**inputs, use_cache=False).last_hidden_state[:, keep]
        head = causal.get_output_embeddings()
        return chunked_loss.chunked_head_loss_sum(
            hidden.reshape(-1, hidden.shape[-1]), head.weight, targets[:, keep].reshape(-1)
        )
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    picked = targets[:, keep]
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), picked.reshape(-1),
        ignore_index=IGNORE, reduction="sum",
    )


def lr_lambda(training: TrainingSpec, total_steps: int) -> Any:
    """Warm-up then cosine, linear or constant; a function of the step for LambdaLR."""
    warmup = math.ceil(float(training.warmup_ratio) * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if training.lr_scheduler is LrScheduler.COSINE:
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if training.lr_scheduler is LrScheduler.LINEAR:
            return max(0.0, 1.0 - progress)
        return 1.0

    return factor


def make_optimizer(
    model: torch.nn.Module, training: TrainingSpec, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=float(training.learning_rate), weight_decay=float(training.weight_decay),
        fused=bool(params) and params[0].is_cuda,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(training, total_steps))
    return optimizer, scheduler


def autocast_loss_sum(model: torch.nn.Module, batch: dict[str, Any], device: torch.device,
                      bf16: bool) -> torch.Tensor:
    """`token_loss_sum` under bf16 autocast when `bf16` is set, as is otherwise."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return token_loss_sum(model, batch)


def current_lr(scheduler: Any) -> float:
    return float(scheduler.get_last_lr()[0])


class TorchStepper:
    """One process, no DeepSpeed: backward, clip, AdamW step."""

    def __init__(self, model: torch.nn.Module, training: TrainingSpec, total_steps: int,
                 device: torch.device) -> None:
        self.model = model
        self.device = device
        self.optimizer, self.scheduler = make_optimizer(model, training, total_steps)
        self.max_grad_norm = float(training.max_grad_norm)
        # bf16 autocast on GPUs that have it; CPUs train in fp32 (the DeepSpeed "auto" rule).
        self.autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()

    def loss_sum(self, batch: dict[str, Any]) -> torch.Tensor:
        return autocast_loss_sum(self.model, batch, self.device, self.autocast)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def lr(self) -> float:
        return current_lr(self.scheduler)


class DeepSpeedStepper:
    """DeepSpeed ZeRO with KubeTune's AdamW and schedule (no compiled DeepSpeed ops needed).

    DeepSpeed clips (its `gradient_clipping`) and casts the model itself in bf16 mode, so the
    loss runs without autocast."""

    def __init__(self, model: torch.nn.Module, training: TrainingSpec, total_steps: int,
                 device: torch.device, config: dict[str, Any]) -> None:
        import deepspeed

        self.device = device
        optimizer, scheduler = make_optimizer(model, training, total_steps)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
        )
        self.model = self.ds

    def loss_sum(self, batch: dict[str, Any]) -> torch.Tensor:
        return autocast_loss_sum(self.model, batch, self.device, bf16=False)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)

    def step(self) -> float:
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return current_lr(self.scheduler)


Stepper = TorchStepper | DeepSpeedStepper
"""The optimizer step as the loop drives it: `model` (what runs forward: DeepSpeed's wrapper
under ZeRO), `loss_sum(batch)`, `backward(loss)`, `step()` (returns the gradient norm before
clipping) and `lr`. Both implement all of it; checkpoints and outputs tell them apart with
`isinstance`, since DeepSpeed saves and gathers its own sharded state."""
