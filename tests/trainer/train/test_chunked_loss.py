"""The chunked output head and loss (`train/chunked_loss.py`) against the full logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune.api import FineTuneJobSpec
from kubetune_trainer.sources import ModelLocation
from kubetune_trainer.train import model as models
from kubetune_trainer.train.chunked_loss import chunked_head_loss_sum
from kubetune_trainer.train.encoding import IGNORE
from kubetune_trainer.train.stepper import plain_causal_lm, token_loss_sum


def problem(rows: int = 300, hidden: int = 64, vocab: int = 1000) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(5)
    h = torch.randn(rows, hidden, generator=generator, requires_grad=True)
    w = (torch.randn(vocab, hidden, generator=generator) * 0.3).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[::4] = IGNORE
    return h, w, targets


@pytest.mark.parametrize("chunk", [1, 7, 128, 1000])
def test_the_sum_and_both_gradients_match_the_full_logits(chunk: int) -> None:
    h, w, targets = problem()
    full = torch.nn.functional.cross_entropy(h @ w.t(), targets, ignore_index=IGNORE,
                                             reduction="sum")
    full.backward()
    expected = (h.grad.clone(), w.grad.clone())  # type: ignore[union-attr]
    h.grad = w.grad = None
    chunked = chunked_head_loss_sum(h, w, targets, chunk)
    (chunked * 0.5).backward()  # the incoming gradient scales both
    assert chunked.item() == pytest.approx(full.item(), rel=1e-5)
    torch.testing.assert_close(h.grad, expected[0] * 0.5, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad, expected[1] * 0.5, rtol=1e-4, atol=1e-6)


def test_without_gradients_it_only_sums() -> None:
    h, w, targets = problem()
    with torch.no_grad():
        total = chunked_head_loss_sum(h, w, targets, 64)
        full = torch.nn.functional.cross_entropy(h @ w.t(), targets, ignore_index=IGNORE,
                                                 reduction="sum")
    assert total.item() == pytest.approx(full.item(), rel=1e-5)


def lora_model(builtin_model: Path) -> Any:
    job = FineTuneJobSpec.model_validate({
        "model": {"source": "builtin://smollm2-135m-instruct"},
        "dataset": {"source": "file:///unused.jsonl"},
        "method": "LoRA", "lora": {"rank": 8, "alpha": 16, "dropout": "0"},
    })
    base = models.load_base(ModelLocation(str(builtin_model), None, False), job)
    model = models.prepare(base, job)
    with torch.no_grad():  # a trained-looking adapter, so its gradients are not all zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(2))
                            * 0.02)
    return model


def test_the_trainers_loss_on_the_builtin_model_matches_the_full_logits_path(
    builtin_model: Path,
) -> None:
    model = lora_model(builtin_model)
    assert plain_causal_lm(model) is not None
    lengths = [40, 70, 30]
    ids = torch.randint(100, 20000, (1, sum(lengths)), generator=torch.Generator().manual_seed(1))
    targets = ids.roll(-1, 1).clone()
    targets[0, :12] = IGNORE
    cuts = torch.tensor([0, 40, 110, 140], dtype=torch.int32)
    batch = {"input_ids": ids, "targets": targets,
             "position_ids": torch.tensor([[p for n in lengths for p in range(n)]]),
             "cu_seq_lens_q": cuts, "cu_seq_lens_k": cuts, "max_length_q": 70,
             "max_length_k": 70}
    chunked = token_loss_sum(model, batch)
    chunked.backward()
    chunked_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    keep = (targets != IGNORE).any(dim=0).nonzero().squeeze(-1)
    inputs = {k: v for k, v in batch.items() if k != "targets"}
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    full = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                             targets[:, keep].reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")
    full.backward()
    assert chunked.item() == pytest.approx(full.item(), rel=1e-4)
    # Float rounding differs elementwise through 30 layers; each gradient as a whole agrees.
    worst = max(float((chunked_grads[n] - p.grad).norm() / p.grad.norm())
                for n, p in model.named_parameters() if p.requires_grad)
    assert worst < 1e-4
