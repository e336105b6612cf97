"""Which quantization keeps the fine-tuned model's accuracy, and at what speed: each candidate
built by onnxruntime-genai's builder from the same merged weights, served by KubeTune's server
(default `batch` engine), scored on the held-out test split (greedy exact match, as `kubetune
run` scores it) and timed single-stream (64 greedy tokens on bench/inference.py's prompts, all
servers up at once, interleaved rounds, medians), in one run on one machine.

    python bench/quantization.py [--model runs/quickstart/merged] [--test FILE]
                                 [--work /tmp/kubetune-quant] [--only NAME,NAME] [--rounds 3]

`--model` is a merged transformers directory (`make run` writes runs/quickstart/merged);
`--test` defaults to the built-in dataset's test split. Prints, per candidate: exact match,
points below FP32, decode tokens/s and its ratio to FP32, model bytes. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from inference import PROMPTS, machine, stream_once
from structured_output import serve

# name -> (builder precision, --extra_options). accuracy_level=4 (int8 activations) is the
# builder's CPU default for MatMulNBits, spelled out so every INT4/INT8 row says what it ran.
CANDIDATES: dict[str, tuple[str, list[str]]] = {
    "FP32": ("fp32", []),
    "INT8": ("int8", ["accuracy_level=4"]),
    "INT4 RTN b32": ("int4", ["block_size=32", "accuracy_level=4"]),
    # (is_symmetric=false builds a graph ONNX Runtime 1.32 refuses to load for this tied-
    # embedding model: a uint8 Reshape output where float is expected.)
    "INT4 RTN b32 fp32-act": ("int4", ["block_size=32", "accuracy_level=1"]),
    "INT4 RTN b16": ("int4", ["block_size=16", "accuracy_level=4"]),
    "INT4 rtn_last": ("int4", ["block_size=32", "accuracy_level=4", "algo_config=rtn_last"]),
    "INT4 k_quant": ("int4", ["block_size=32", "accuracy_level=4", "algo_config=k_quant"]),
    "INT4 k_quant b16": ("int4", ["block_size=16", "accuracy_level=4", "algo_config=k_quant"]),
    "INT4 k_quant_mixed": ("int4", ["block_size=32", "accuracy_level=4",
                                    "algo_config=k_quant_mixed"]),
    # RTN's graph re-rounded by GPTQ (kubetune_trainer/export/requantize.py), calibrated on
    # the first training records as the trainer's calibration.json is.
    "INT4 GPTQ": ("int4", ["block_size=32", "accuracy_level=4"]),
}
CALIBRATION_RECORDS = 128


def build(model: Path, output: Path, precision: str, options: list[str]) -> Path:
    if (output / "genai_config.json").is_file():
        return output
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model),
               "-o", str(output), "-p", precision, "-e", "cpu", "-c", str(output.parent / "cache")]
    if options:
        command += ["--extra_options", *options]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (model / name).is_file():
            shutil.copy2(model / name, output / name)
    return output


def gptq(model: Path, rtn: Path, output: Path) -> Path:
    """A copy of the RTN export with its INT4 weights re-rounded by GPTQ."""
    if (output / "genai_config.json").is_file():
        return output
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.export.requantize import requantize
    from kubetune_trainer.tokenizer import ServingTokenizer

    staging = output.with_name(output.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(rtn, staging)
    tokenizer = ServingTokenizer.load(rtn)
    train = Path(__file__).resolve().parents[1] / (
        "trainer-image/src/kubetune_trainer/datasets/kubectl-commands/train.jsonl")
    sequences = [
        tokenizer.encode(tokenizer.render_chat(json.loads(line)["messages"], False),
                         add_special_tokens=False)
        for line in train.read_text().splitlines()[:CALIBRATION_RECORDS]
    ]
    loaded = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    print(f"{output.name}: output error {requantize(staging, loaded.eval(), sequences):.3f} of "
          "RTN's", flush=True)
    staging.rename(output)
    return output


def accuracy(model_dir: Path, examples: list[Any]) -> dict[str, float]:
    from kubetune.local.evaluate import evaluate

    url, process = serve(model_dir, 256)  # room for the longest reference answer
    try:
        score = evaluate(url + "/v1", model_dir.name, examples)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(120)
    return {
        "correct": score.correct,
        "total": score.total,
        "bytes": sum(f.stat().st_size for f in model_dir.glob("model.onnx*")),
    }


def decode_speeds(model_dirs: dict[str, Path], rounds: int,
                  tokens: int = 64) -> dict[str, float]:
    """Single-stream decode tokens/s per candidate: every server up at once, each idle while
    another is timed, in interleaved rounds (medians), so drift hits all alike."""
    servers = {}
    try:
        for name, model_dir in model_dirs.items():
            servers[name] = (*serve(model_dir, tokens), model_dir.name)
            stream_once(servers[name][0], model_dir.name, PROMPTS[0], 8)  # warm the HTTP path
        timings: dict[str, list[float]] = {name: [] for name in servers}
        for _ in range(rounds):
            for name, (url, _, model) in servers.items():
                runs = [stream_once(url, model, prompt, tokens) for prompt in PROMPTS]
                timings[name].append(
                    sum(r["tokens"] - 1 for r in runs) / sum(r["decode"] for r in runs))
    finally:
        for _, process, _ in servers.values():
            process.send_signal(signal.SIGTERM)
            process.wait(120)
    return {name: statistics.median(values) for name, values in timings.items()}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=Path("runs/quickstart/merged"))
    parser.add_argument("--test", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/kubetune-quant"))
    parser.add_argument("--only", help="comma-separated candidate names (FP32 is always run)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved speed rounds")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from kubetune.local.evaluate import load_chat_examples

    test = args.test or Path(__file__).resolve().parents[1] / (
        "trainer-image/src/kubetune_trainer/datasets/kubectl-commands/test.jsonl")
    examples = load_chat_examples(test)
    names = ["FP32", *(n for n in (args.only or ",".join(CANDIDATES)).split(",") if n != "FP32")]
    results, model_dirs = {}, {}
    for name in names:
        precision, options = CANDIDATES[name]
        slug = name.lower().replace(" ", "-")
        if name == "INT4 GPTQ":
            rtn = build(args.model, args.work / "int4-rtn-b32", precision, options)
            model_dir = gptq(args.model, rtn, args.work / slug)
        else:
            model_dir = build(args.model, args.work / slug, precision, options)
        try:
            results[name] = accuracy(model_dir, examples)
        except RuntimeError as error:  # a candidate that does not load is reported, not fatal
            print(f"{name}: {error}", flush=True)
            continue
        model_dirs[name] = model_dir
        print(name, results[name], flush=True)
    speeds = decode_speeds(model_dirs, args.rounds)
    fp32 = results["FP32"]
    print(machine())
    print(f"single-stream decode: 64 greedy tokens, median of {args.rounds} interleaved rounds")
    print(f"{'candidate':20} {'exact':>8} {'vs FP32':>7} {'decode tok/s':>12} {'x FP32':>6} "
          f"{'MB':>6}")
    for name, r in results.items():
        print(f"{name:20} {r['correct']:>4}/{r['total']:<3} {r['correct'] - fp32['correct']:>+7} "
              f"{speeds[name]:12.1f} {speeds[name] / speeds['FP32']:6.2f} "
              f"{r['bytes'] / 1e6:6.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
