"""The GPU path at a size where speed means something: LoRA and QLoRA with ZeRO-2 and ZeRO-3
on one GPU, on a 1.4B model (random weights in Qwen2.5-1.5B's layer shape, as a Llama, with the
built-in tokenizer and its 49,152-token vocabulary). Prints tokens/s and model-FLOPs utilisation;
asserts only that each run trains. Skipped without CUDA (`-m gpu` selects this tier).

MFU counts 6 FLOPs per parameter and token (the usual convention, so figures compare with
published ones) plus causal attention, over the GPU's dense bf16 peak (`$KUBETUNE_GPU_PEAK_TFLOPS`,
default 989 for an H100/H200 SXM). LoRA skips the frozen weights' gradient, so about a third of
those FLOPs are never spent: the useful-work MFU is 2/3 of the printed figure.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from kubetune.api import FineTuneJobSpec, PlanStatus
from kubetune.planner.deepspeed import deepspeed_config
from tests.trainer.conftest import metrics, report, run_config, start_training, succeeded

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs CUDA: no GPU on this machine (torch.cuda.is_available())"),
]

SHAPE = {"hidden_size": 1536, "num_hidden_layers": 28, "intermediate_size": 8960,
         "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 49152,
         "max_position_embeddings": 4096, "tie_word_embeddings": True}


@pytest.fixture(scope="module")
def model_1p4b(tmp_path_factory: pytest.TempPathFactory, builtin_model: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target = tmp_path_factory.mktemp("llama-1p4b")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SHAPE)).save_pretrained(target)
    AutoTokenizer.from_pretrained(builtin_model).save_pretrained(target)
    return target


def long_records(path: Path, count: int = 96, words: int = 700) -> Path:
    """Chat records of about a thousand tokens each (deterministic)."""
    vocabulary = ["pod", "node", "deploy", "service", "volume", "replica", "config", "label"]
    lines = []
    for index in range(count):
        text = " ".join(vocabulary[(index * 7 + i * i) % len(vocabulary)] for i in range(words))
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": text[: len(text) // 3]},
            {"role": "assistant", "content": text[len(text) // 3 :]}]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def parameters() -> int:
    h, layers, ff, vocab = (SHAPE["hidden_size"], SHAPE["num_hidden_layers"],
                            SHAPE["intermediate_size"], SHAPE["vocab_size"])
    kv = h // SHAPE["num_attention_heads"] * SHAPE["num_key_value_heads"]
    return layers * (2 * h * h + 2 * h * kv + 3 * h * ff) + vocab * h


@pytest.mark.parametrize(("method", "zero"), [("LoRA", 2), ("LoRA", 3), ("QLoRA", 2),
                                               ("QLoRA", 3)])
def test_adapters_train_fast_on_one_gpu(tmp_path: Path, model_1p4b: Path, method: str,
                                        zero: int) -> None:
    data = long_records(tmp_path / "long.jsonl")
    config = run_config(data, None, method=method, steps=12, batch=16, zero=zero,
                        maxSeqLength=1024)
    config["spec"]["model"] = {"source": f"file://{model_1p4b}"}
    config["spec"]["lora"] = {"rank": 16, "alpha": 32, "dropout": "0.05"}
    config["spec"]["resources"] = {"gpusPerNode": 1, "nodes": 1, "gpuMemoryGiB": 140}
    # Packed rows of up to 4 x 1,024 tokens, four per optimizer step of 16 records.
    config["plan"].update({"microBatchSize": 4, "gradientAccumulationSteps": 4,
                           "globalBatchSize": 16})
    config["deepspeed"] = dict(deepspeed_config(FineTuneJobSpec.model_validate(config["spec"]),
                                                PlanStatus.model_validate(config["plan"])))
    output = tmp_path / f"{method}-zero{zero}"
    succeeded(start_training(config, output, timeout=1500))
    done = report(output)
    losses = [m["loss"] for m in metrics(output)]
    assert done["status"] == "Succeeded" and losses[-1] < losses[0]
    speeds = [m["tokensPerSecond"] for m in metrics(output)][2:]  # past the warm-up steps
    tokens_per_second = sum(speeds) / len(speeds)
    peak = float(os.environ.get("KUBETUNE_GPU_PEAK_TFLOPS", "989")) * 1e12
    mfu = 6 * parameters() * tokens_per_second / peak
    print(f"\n{method} ZeRO-{zero} on {torch.cuda.get_device_name()}: {tokens_per_second:.0f} "
          f"tokens/s, MFU {mfu:.1%} (6N), peak GPU memory {done['peakGpuMemoryMiB']:.0f} MiB")
