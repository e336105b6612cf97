"""The masked-dropout LoRA (`train/lean_lora.py`) computes exactly what peft computes and keeps
less for the backward pass."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune.api import FineTuneJobSpec
from kubetune_trainer.sources import ModelLocation
from kubetune_trainer.train import lean_lora
from kubetune_trainer.train import model as models
from kubetune_trainer.train.encoding import IGNORE
from kubetune_trainer.train.lean_lora import MaskedDropoutLinear
from kubetune_trainer.train.stepper import token_loss_sum


def spec(method: str = "LoRA", dropout: str = "0.1") -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate({
        "model": {"source": "builtin://smollm2-135m-instruct"},
        "dataset": {"source": "file:///unused.jsonl"},
        "method": method, "lora": {"rank": 8, "alpha": 16, "dropout": dropout},
    })


def adapted(builtin_model: Path, job: FineTuneJobSpec, lean: bool) -> Any:
    """The built-in model with peft's adapter, with or without the masked dropout."""
    from peft import get_peft_model

    base = models.load_base(ModelLocation(str(builtin_model), None, False), job)
    model = get_peft_model(base, models.lora_config(job))
    if lean:
        assert lean_lora.use_masked_dropout(model) == 30 * 7  # 30 layers x 7 linear layers
    return model


def packed_batch() -> dict[str, Any]:
    lengths = [37, 61, 24]
    ids = torch.randint(100, 20000, (1, sum(lengths)), generator=torch.Generator().manual_seed(1))
    targets = ids.roll(-1, 1).clone()
    targets[0, :10] = IGNORE
    cuts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return {"input_ids": ids, "targets": targets,
            "position_ids": torch.tensor([[p for n in lengths for p in range(n)]]),
            "cu_seq_lens_q": cuts, "cu_seq_lens_k": cuts, "max_length_q": max(lengths),
            "max_length_k": max(lengths)}


def with_trained_b(stock: Any, lean: Any) -> None:
    """Give both the same non-zero lora_B (a fresh one is zero, which hides the dropout from
    the loss and from lora_A's gradient) and the same lora_A."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in stock.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    lean.load_state_dict(stock.state_dict())


def loss_and_grads(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    model.train()
    torch.manual_seed(7)  # the same dropout draws on both sides
    loss = token_loss_sum(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_the_loss_and_every_gradient_equal_peft_bit_for_bit(builtin_model: Path) -> None:
    job = spec()
    stock, lean = adapted(builtin_model, job, False), adapted(builtin_model, job, True)
    with_trained_b(stock, lean)
    batch = packed_batch()
    stock_loss, stock_grads = loss_and_grads(stock, batch)
    lean_loss, lean_grads = loss_and_grads(lean, batch)
    assert lean_loss.item() == stock_loss.item()
    assert lean_grads.keys() == stock_grads.keys()
    differing = [n for n in stock_grads if not torch.equal(stock_grads[n], lean_grads[n])]
    assert differing == []
    assert all(g.abs().sum() > 0 for g in lean_grads.values())
    # Dropout really happened: another seed gives another loss.
    torch.manual_seed(8)
    assert token_loss_sum(lean, batch).item() != lean_loss.item()
    # Evaluation has no dropout: both sides agree with no seed at all.
    stock.eval()
    lean.eval()
    with torch.no_grad():
        assert token_loss_sum(lean, batch).item() == token_loss_sum(stock, batch).item()


def saved_bytes(model: Any, batch: dict[str, Any]) -> int:
    """Bytes autograd keeps for the backward pass of one forward (parameters left out)."""
    parameters = {p.data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_loss_sum(model, batch)
    return sum(storages.values())


def test_it_keeps_a_third_less_for_the_backward_pass(builtin_model: Path) -> None:
    job = spec()
    batch = packed_batch()
    stock = saved_bytes(adapted(builtin_model, job, False), batch)
    lean = saved_bytes(adapted(builtin_model, job, True), batch)
    assert lean < 0.75 * stock, (lean, stock)


def test_saving_and_merging_see_the_same_adapter(builtin_model: Path, tmp_path: Path) -> None:
    job = spec()
    stock, lean = adapted(builtin_model, job, False), adapted(builtin_model, job, True)
    with_trained_b(stock, lean)
    assert lean.state_dict().keys() == stock.state_dict().keys()
    lean.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    merged_lean = copy.deepcopy(lean).merge_and_unload()
    merged_stock = copy.deepcopy(stock).merge_and_unload()
    assert not any(isinstance(m, MaskedDropoutLinear) for m in merged_lean.modules())
    for (name, a), (_, b) in zip(merged_lean.state_dict().items(),
                                 merged_stock.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(("method", "dropout"), [("DoRA", "0.1"), ("LoRA", "0")])
def test_dora_and_dropout_zero_are_left_as_peft_builds_them(
    builtin_model: Path, method: str, dropout: str
) -> None:
    from peft import get_peft_model

    job = spec(method, dropout)
    base = models.load_base(ModelLocation(str(builtin_model), None, False), job)
    assert lean_lora.use_masked_dropout(get_peft_model(base, models.lora_config(job))) == 0


def test_prepare_uses_it_for_lora(builtin_model: Path) -> None:
    job = spec()
    base = models.load_base(ModelLocation(str(builtin_model), None, False), job)
    prepared = models.prepare(base, job)
    assert sum(isinstance(m, MaskedDropoutLinear) for m in prepared.modules()) == 210
