"""Shared fixtures for the data-plane tests: offline Hub, the built-in model, tiny runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import FineTuneJobSpec, PlanStatus
from kubetune.planner.deepspeed import deepspeed_config

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[2]

QA = [
    ("List pods in namespace shop", "kubectl get pods -n shop"),
    ("Delete deployment web", "kubectl delete deployment web"),
    ("Show nodes", "kubectl get nodes"),
    ("Scale deployment api to 3 replicas", "kubectl scale deployment api --replicas=3"),
]


@pytest.fixture(scope="session")
def builtin_model() -> Path:
    """The built-in SmolLM2-135M-Instruct as a transformers directory (converted once)."""
    from kubetune_trainer.builtin import builtin_model_dir

    try:
        return builtin_model_dir("smollm2-135m-instruct")
    except FileNotFoundError as error:
        pytest.skip(f"built-in model unavailable: {error}")


def chat_line(question: str, answer: str) -> str:
    return json.dumps({"messages": [
        {"role": "system", "content": "Answer with one kubectl command."},
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
    ]})


def write_tiny_dataset(directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    train = directory / "train.jsonl"
    train.write_text("".join(chat_line(q, a) + "\n" for q, a in QA))
    validation = directory / "validation.jsonl"
    validation.write_text("".join(chat_line(q, a) + "\n" for q, a in QA[:2]))
    return train, validation


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> tuple[Path, Path]:
    """Four chat records (train) and two of them again (validation)."""
    return write_tiny_dataset(tmp_path / "data")


def run_config(train: Path, validation: Path | None, *, method: str = "LoRA", steps: int = 3,
               batch: int = 4, world: int = 1, zero: int = 0, **training: Any) -> dict[str, Any]:
    """A RunConfig document for a tiny run with a hand-made plan."""
    dataset: dict[str, Any] = {"source": f"file://{train}"}
    if validation is not None:
        dataset["validation"] = {"source": f"file://{validation}"}
    spec: dict[str, Any] = {
        "model": {"source": "builtin://smollm2-135m-instruct"},
        "dataset": dataset,
        "method": method,
        "training": {"maxSteps": steps, "epochs": 100, "batchSize": batch, "maxSeqLength": 128,
                     "logEverySteps": 1, "learningRate": "1e-3", "warmupRatio": "0",
                     "lrScheduler": "Constant", **training},
        "resources": {"gpusPerNode": 0, "nodes": world},
        "checkpoint": {"everySteps": 1000, "keep": 2},
    }
    if method != "Full":
        spec["lora"] = {"rank": 8, "alpha": 16, "dropout": "0"}
    micro = max(1, batch // world)
    plan = {"worldSize": world, "zeroStage": zero, "microBatchSize": micro,
            "gradientAccumulationSteps": 1, "globalBatchSize": micro * world,
            "estimatedGpuMemoryGiB": "1"}
    # The DeepSpeed config the control plane writes beside the plan (as the operator does).
    deepspeed = deepspeed_config(FineTuneJobSpec.model_validate(spec),
                                 PlanStatus.model_validate(plan))
    return {"name": "test", "spec": spec, "plan": plan, "deepspeed": dict(deepspeed)}


def trainer_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "HF_HUB_OFFLINE": "1", "KUBETUNE_EVAL_MAX_RECORDS": "2", "OMP_NUM_THREADS": "1",
        "KUBETUNE_TERMINATION_LOG": str(tmp_path / "termination-log"),
        "KUBETUNE_REPORT_URL": "", **extra,
    })
    return env


def start_training(config: dict[str, Any], output: Path, *, ranks: int = 1,
                   timeout: float = 900, env: dict[str, str] | None = None,
                   ) -> subprocess.CompletedProcess[str]:
    """Run `python -m kubetune_trainer train` (under torchrun for several ranks)."""
    config_path = output.parent / f"{output.name}.run.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config))
    command = [sys.executable, "-m", "kubetune_trainer", "train", "--config",
               str(config_path), "--output", str(output)]
    if ranks > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={ranks}", "-m", *command[2:]]
    return subprocess.run(command, env=trainer_env(output.parent, **(env or {})), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)


def succeeded(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="session")
def lora_reference(tmp_path_factory: pytest.TempPathFactory, builtin_model: Path) -> Path:
    """One uninterrupted LoRA run (4 steps, checkpoint every 2, validation) shared by tests."""
    root = tmp_path_factory.mktemp("lora-reference")
    train, validation = write_tiny_dataset(root / "data")
    config = run_config(train, validation, steps=4)
    config["spec"]["checkpoint"]["everySteps"] = 2
    output = root / "out"
    succeeded(start_training(config, output))
    return output


def metrics(output: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def report(output: Path) -> dict[str, Any]:
    return dict(json.loads((output / "report.json").read_text()))
