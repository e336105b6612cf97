"""Padding-free attention for packed rows on any device.

A packed row holds several records back to back, with position ids restarting at each record.
Flash-attention kernels take the record boundaries (`cu_seq_lens_q`) and keep records apart;
SDPA and eager attention on a CPU do not, and a block-diagonal mask over the whole row makes
attention cost grow with the square of the row length. This implementation runs causal SDPA
once per record slice instead: exact (no record sees another) and no wasted work, at the price
of one kernel call per record and layer, which is cheap next to the linear layers.

Registered with transformers as `kubetune_varlen`. Calls without boundaries (evaluation,
generation, padded batches) fall through to the stock SDPA implementation.

SDPA has no logit soft-capping (Gemma 2 caps attention scores with tanh) and no sliding window
of its own. A layer that soft-caps, or whose window is shorter than a record, gets the exact
eager computation per record instead; calls without boundaries go to the model's own eager
attention, read from the module's modeling file, so nothing here names a family.
"""

from __future__ import annotations

import importlib.util
import sys
from itertools import pairwise
from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "kubetune_varlen"


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention per record of a packed row; `query` is [1, heads, tokens, dim]."""
    boundaries = kwargs.get("cu_seq_lens_q")
    softcap = kwargs.get("softcap")
    window = kwargs.get("sliding_window")
    if boundaries is None or query.shape[0] != 1:
        if softcap is not None:
            eager = sys.modules[type(module).__module__].eager_attention_forward
            return eager(module, query, key, value, attention_mask, dropout=dropout,
                         scaling=scaling, **kwargs)
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    gqa = key.shape[1] != query.shape[1]
    cuts = boundaries.tolist()
    outputs = []
    for start, end in pairwise(cuts):
        if softcap is not None or (window is not None and end - start > window):
            outputs.append(_eager_causal(
                query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                scaling, softcap, window, dropout if module.training else 0.0))
            continue
        outputs.append(
            torch.nn.functional.scaled_dot_product_attention(
                query[:, :, start:end],
                key[:, :, start:end],
                value[:, :, start:end],
                dropout_p=dropout if module.training else 0.0,
                scale=scaling,
                is_causal=True,
                enable_gqa=gqa,
            )
        )
    # transformers expects [batch, tokens, heads, dim].
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def _eager_causal(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
    softcap: float | None, window: int | None, dropout: float,
) -> torch.Tensor:
    """Causal attention of one record, scores capped by `softcap * tanh(s / softcap)` and
    limited to the last `window` positions, as the models' eager attention computes it."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = (query @ key.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    positions = torch.arange(query.shape[2], device=query.device)
    distance = positions[:, None] - positions[None, :]
    allowed = distance >= 0
    if window is not None:
        allowed &= distance < window
    scores = scores.masked_fill(~allowed, float("-inf"))
    probabilities = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    probabilities = torch.nn.functional.dropout(probabilities, p=dropout, training=dropout > 0)
    return probabilities @ value


def choose(device_type: str) -> str:
    """FlashAttention-2's own varlen kernel on GPUs that have it installed, else ours."""
    if device_type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return register()


def register() -> str:
    """Register the implementation (idempotent) and return its name for `attn_implementation`."""
    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
