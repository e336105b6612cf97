"""The trainer on CUDA: DeepSpeed with nccl and bf16. Skipped on machines without a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.trainer.conftest import metrics, report, run_config, start_training, succeeded

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs CUDA: no GPU on this machine (torch.cuda.is_available())"),
]


@pytest.mark.parametrize("zero", [0, 2])
def test_lora_trains_on_one_gpu_with_deepspeed(
    tmp_path: Path, tiny_dataset: tuple[Path, Path], builtin_model: Path, zero: int
) -> None:
    train, validation = tiny_dataset
    config = run_config(train, validation, steps=4, zero=zero)
    config["spec"]["resources"] = {"gpusPerNode": 1, "nodes": 1, "gpuMemoryGiB": 80}
    output = tmp_path / f"gpu-zero{zero}"
    succeeded(start_training(config, output))
    final = report(output)
    assert final["status"] == "Succeeded" and final["steps"] == 4
    losses = [m["loss"] for m in metrics(output)]
    assert losses[-1] < losses[0]
    if zero:
        written = json.loads((output / "deepspeed.json").read_text())
        assert written["zero_optimization"]["stage"] == zero
        assert written["bf16"]["enabled"] is torch.cuda.is_bf16_supported()
