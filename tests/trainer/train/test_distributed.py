"""Two ranks under torchrun with DeepSpeed ZeRO-2 and ZeRO-3 (gloo on CPU) agree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.conftest import metrics, report, run_config, start_training, succeeded


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory: pytest.TempPathFactory, builtin_model: Path) -> dict[int, Path]:
    from tests.trainer.conftest import write_tiny_dataset

    root = tmp_path_factory.mktemp("zero")
    train, _ = write_tiny_dataset(root / "data")
    outputs = {}
    for stage in (2, 3):
        output = root / f"zero{stage}"
        succeeded(start_training(run_config(train, None, steps=2, world=2, zero=stage), output,
                                 ranks=2))
        outputs[stage] = output
    return outputs


@pytest.mark.slow
def test_zero2_and_zero3_finish_and_write_their_config(zero_runs: dict[int, Path]) -> None:
    import json

    for stage, output in zero_runs.items():
        final = report(output)
        assert final["status"] == "Succeeded" and final["worldSize"] == 2 and final["deepspeed"]
        config = json.loads((output / "deepspeed.json").read_text())
        assert config["zero_optimization"]["stage"] == stage
        assert config["bf16"]["enabled"] is False  # CPU: fp32
        assert config["train_batch_size"] == 4


@pytest.mark.slow
def test_ranks_and_stages_agree_with_one_process(zero_runs: dict[int, Path],
                                                 lora_reference: Path) -> None:
    """Same data per step and token-weighted loss: 2 ranks compute what 1 process does."""
    single = [m["loss"] for m in metrics(lora_reference)][:2]
    for output in zero_runs.values():
        assert [m["loss"] for m in metrics(output)] == pytest.approx(single, rel=1e-4)
    weights = [load_file(str(out / "adapter" / "adapter_model.safetensors"))
               for out in zero_runs.values()]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], atol=1e-4, rtol=1e-3)


def test_starting_deepspeed_compiles_no_extension(tmp_path: Path) -> None:
    """DeepSpeed's CPU backend built its shared-memory all-reduce (a C++ extension, two c++
    processes of ~1.5 GB) in every trainer pod as it started, which OOM-killed a 5 GiB pod;
    training never uses it, so nothing is compiled."""
    import os
    import subprocess
    import sys
    import textwrap

    extensions = tmp_path / "torch-extensions"
    script = textwrap.dedent("""
        import deepspeed.comm.comm as comm
        from kubetune_trainer.train import distributed
        distributed.init(distributed.Ranks(rank=0, world=1, local_rank=0), need_group=True)
        print("shared-memory op:", comm.cdb.shm_comm_op)
    """)
    rendezvous = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}
    env["TORCH_EXTENSIONS_DIR"] = str(extensions)
    started = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                             text=True, timeout=600, check=False)  # fmt: skip
    assert started.returncode == 0, started.stderr[-3000:]
    assert "shared-memory op: None" in started.stdout, started.stdout
    assert not list(extensions.rglob("*.so")), list(extensions.rglob("*"))
