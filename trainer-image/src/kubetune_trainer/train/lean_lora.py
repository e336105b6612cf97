"""LoRA's dropout without the copies autograd keeps of it.

peft computes each adapter as `lora_B(lora_A(dropout(x)))`. torch's CPU dropout multiplies `x`
by a float noise tensor, so the backward pass keeps that noise (4 bytes per input element) and
the dropped copy `lora_A` needs for its weight gradient (4 more), once per adapted layer: the
input of q, k and v is kept three times over, gate and up twice. Measured on the built-in model
with `bench/train_memory.py`, that was 70 of the 127 bytes per token, layer and hidden unit
autograd saved for a LoRA step with dropout 0.05: more than the MLP, attention and norms
together.

`MaskedDropoutLinear` takes `lora_A`'s place and does the dropout itself. It draws the same
noise the same way torch's dropout does (`bernoulli_` on a tensor like `x`), keeps a 1-byte
mask beside the input (which q, k and v, or gate and up, share), and recomputes the dropped
input in the backward pass. Same random draws, same arithmetic: on a CPU the loss and the
gradients equal peft's own to the last bit (`tests/trainer/train/test_lean_lora.py`).

Only vanilla LoRA layers with dropout are changed: DoRA (a peft "variant") uses the dropped
input in its own way, and with dropout 0 there is nothing to save. The parameters stay the
same objects under the same names, so optimizers, checkpoints, `save_pretrained` and
`merge_and_unload` see no difference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional


def _keep_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of the kept elements, the dropout multiplier): torch's CPU dropout draw."""
    noise = torch.empty_like(x).bernoulli_(1 - p)
    keep = noise.bool()
    return keep, noise.div_(1 - p)


class _DropoutLinear(torch.autograd.Function):
    """`linear(dropout(x), weight)` that saves `x` and a bool mask, not the dropped copy."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
        keep, multiplier = _keep_mask(x, p)
        out = functional.linear(x * multiplier, weight)
        ctx.save_for_backward(x, keep, weight)
        ctx.p = p
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, keep, weight = ctx.saved_tensors
        multiplier = keep.to(x.dtype).div_(1 - ctx.p)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.matmul(weight.to(grad.dtype)) * multiplier
        if ctx.needs_input_grad[1]:
            dropped = (x * multiplier).to(grad.dtype)
            grad_weight = grad.reshape(-1, grad.shape[-1]).t().mm(
                dropped.reshape(-1, dropped.shape[-1])
            ).to(weight.dtype)
        return grad_x, grad_weight, None


class MaskedDropoutLinear(nn.Linear):
    """A bias-free `lora_A` that applies its adapter's dropout in training (see the module
    docstring); in evaluation, or with gradients off, it is dropout then a plain linear."""

    def __init__(self, linear: nn.Linear, p: float) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")
        self.weight = linear.weight  # the same Parameter: optimizers and names are unchanged
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return functional.linear(x, self.weight)
        if not torch.is_grad_enabled():
            return functional.linear(functional.dropout(x, self.p, True), self.weight)
        return _DropoutLinear.apply(x, self.weight, self.p)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={self.p}"


def use_masked_dropout(model: nn.Module) -> int:
    """Move every vanilla LoRA layer's dropout into its `lora_A`; returns how many changed."""
    changed = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        variants = getattr(module, "lora_variant", {})
        for name, dropout in list(dropouts.items()):
            lora_a = module.lora_A[name]  # type: ignore[index]
            if (name in variants or not isinstance(dropout, nn.Dropout) or dropout.p == 0
                    or type(lora_a) is not nn.Linear or lora_a.bias is not None):
                continue
            module.lora_A[name] = MaskedDropoutLinear(lora_a, dropout.p)
            dropouts[name] = nn.Identity()
            changed += 1
    return changed
