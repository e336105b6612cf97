"""The output head and cross-entropy in chunks of rows, never the full logits.

The loss needs `[target tokens x vocabulary]` fp32 logits, and autograd keeps them, the
softmax and then their gradient together: for the built-in model's 49,152-token vocabulary
that is 0.5 GiB of a 3.4 GiB CPU step at 1,024-token rows. Here the head runs on
`CHUNK_ROWS` target positions at a time, and since the loss is the last operation, each
chunk's gradient (softmax minus the one-hot target) is turned into the gradients of the hidden
states and of the head's weight right away, as Liger's fused linear cross-entropy does; only
those (`[targets x hidden]`, and `[vocabulary x hidden]` when the head is trained) are kept
for the backward pass, which scales them by the incoming gradient.

The sum is the same as `cross_entropy(logits, reduction="sum")` up to float rounding (1e-4,
`tests/trainer/train/test_chunked_loss.py`). Models whose head does more than a bias-free
matmul (logit soft-capping or scaling) are not given to it (`supports`).
"""

from __future__ import annotations

from typing import Any

import torch

from kubetune.api.dataplane import HEAD_CHUNK_ROWS
from kubetune_trainer.train.encoding import IGNORE

CHUNK_ROWS = HEAD_CHUNK_ROWS
"""Target positions per chunk: 512 x 49,152 fp32 logits is 96 MiB."""


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:
        want_hidden = ctx.needs_input_grad[0]
        want_weight = ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = hidden[start : start + chunk]
            wanted = targets[start : start + chunk]
            logits = (rows @ weight.t()).float()
            valid = wanted != IGNORE
            safe = torch.where(valid, wanted, 0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe[:, None]).squeeze(1)
            total += torch.where(valid, lse - picked, 0.0).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d(sum of losses)/d(logits) = softmax - one_hot(target), zero on ignored rows.
            logits.sub_(lse[:, None]).exp_()
            logits.scatter_add_(1, safe[:, None], torch.full_like(picked[:, None], -1.0))
            logits.mul_(valid[:, None])
            grad_logits = logits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = grad_logits @ weight.to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ rows).float()
        ctx.save_for_backward(grad_hidden, grad_weight)  # None where not wanted
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad,
                None if grad_weight is None else (grad_weight * grad).to(ctx.weight_dtype),
                None, None)


def chunked_head_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T` ([rows, hidden] x [vocab, hidden]) against
    `targets` ([rows], IGNORE for none), one chunk of rows at a time."""
    return _ChunkedHeadLoss.apply(hidden, weight, targets, chunk)


def supports(causal_lm: Any) -> bool:
    """True when the model's logits are exactly `hidden @ lm_head.weight.T`."""
    head = causal_lm.get_output_embeddings()
    config = causal_lm.config
    return (
        isinstance(head, torch.nn.Linear) and head.bias is None
        and getattr(config, "final_logit_softcapping", None) is None
        and getattr(config, "logit_scale", None) in (None, 1.0)
        and hasattr(causal_lm, "get_decoder")
    )
