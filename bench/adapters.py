"""Many fine-tunes on one base: one server with N LoRA adapters (`serve --lora-modules`) against
one server per merged fine-tune, on the quickstart's real fine-tune, in one run on one machine.

    python bench/adapters.py [--run runs/quickstart] [--work /tmp/kubetune-adapters]
                             [--adapters 4] [--rounds 3] [--tokens 64]

`make run` leaves the run: its adapter (`adapter/`), its merged model and the export it serves
(`onnx/`, what `precision: Auto` picked) and the base model exported at the same weights
(`base-onnx/`). The other N-1 adapters are the quickstart's with lora_B perturbed (seeded):
distinct adapters of the same shape, which is what memory and speed depend on.

Prints:
- accuracy: greedy exact match on the built-in test split for the merged fine-tune and for the
  base + adapter, at FP32 (answers should agree one for one) and at the served precision
  (a stated agreement: on a quantized base the adapter's update is its own, in INT8 with a
  scale per rank column, where the merged export quantizes the merged weights);
- memory: resident set size of the server with 0 and N adapters, against N merged servers;
- speed: single-stream decode of an adapter against its merged model, and the 8-stream
  aggregate with the streams spread over the N adapters against 8 streams on one merged model
  (interleaved rounds, medians).
A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from inference import PROMPTS, STREAMS, machine, stream_once
from structured_output import serve

from kubetune.api.metrics import exact_match
from kubetune.local.evaluate import chat, load_chat_examples
from kubetune.local.processes import export_command
from kubetune_trainer.serve.server import default_served_name

TEST = Path(__file__).resolve().parents[1] / (
    "trainer-image/src/kubetune_trainer/datasets/kubectl-commands/test.jsonl")


def variants(adapter: Path, work: Path, count: int) -> list[Path]:
    """`adapter` and `count - 1` copies with lora_B perturbed by 20% noise (seeded)."""
    from safetensors.numpy import load_file, save_file

    made = [adapter]
    for index in range(1, count):
        target = work / f"variant-{index}"
        if not target.is_dir():
            shutil.copytree(adapter, target)
            rng = np.random.default_rng(index)
            tensors = load_file(str(adapter / "adapter_model.safetensors"))
            for key, value in tensors.items():
                if "lora_B" in key:
                    noise = rng.standard_normal(value.shape).astype(value.dtype)
                    tensors[key] = value + 0.2 * value.std() * noise
            save_file(tensors, str(target / "adapter_model.safetensors"))
        made.append(target)
    return made


def export(source: Path, output: Path, precision: str) -> Path:
    if not (output / "genai_config.json").is_file():
        subprocess.run(export_command(source, output, precision, "CPU"), check=True,
                       stdout=subprocess.DEVNULL)
    return output


def answers(url: str, model: str, examples: list[Any]) -> list[str]:
    return [chat(url + "/v1", model, messages, max_tokens=len(reference) // 2 + 24)
            for messages, reference in examples]


def resident_mb(process: subprocess.Popen[bytes]) -> float:
    status = Path(f"/proc/{process.pid}/status").read_text()
    kilobytes = next(int(line.split()[1]) for line in status.splitlines()
                     if line.startswith("VmRSS:"))
    return kilobytes / 1024


def stop(*processes: subprocess.Popen[bytes]) -> None:
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        process.wait(120)


def compare_accuracy(label: str, merged: Path, base: Path, adapter: Path,
                     examples: list[Any]) -> None:
    """Exact match of the merged model and of base + adapter, and how often they agree."""
    url, process = serve(merged, 256)
    try:
        reference = answers(url, default_served_name(merged), examples)
    finally:
        stop(process)
    url, process = serve(base, 256, "--lora-modules", f"tuned={adapter}")
    try:
        served = answers(url, "tuned", examples)
    finally:
        stop(process)
    correct = [sum(exact_match(a, r) for a, (_, r) in zip(answered, examples, strict=True))
               for answered in (reference, served)]
    same = sum(a == b for a, b in zip(reference, served, strict=True))
    print(f"{label}: exact match merged {correct[0]}/{len(examples)}, base + adapter "
          f"{correct[1]}/{len(examples)}; identical answers {same}/{len(examples)}", flush=True)


def mixed_aggregate(url: str, models: list[str], tokens: int) -> float:
    """Tokens/s of STREAMS concurrent streams, stream i asking for models[i % len(models)]."""
    started = time.perf_counter()
    with ThreadPoolExecutor(STREAMS) as pool:
        runs = list(pool.map(
            lambda i: stream_once(url, models[i % len(models)], PROMPTS[i % len(PROMPTS)],
                                  tokens), range(STREAMS)))
    return sum(r["tokens"] for r in runs) / (time.perf_counter() - started)


def single_decode(url: str, model: str, tokens: int) -> float:
    runs = [stream_once(url, model, prompt, tokens) for prompt in PROMPTS]
    return sum(r["tokens"] - 1 for r in runs) / sum(r["decode"] for r in runs)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/kubetune-adapters"))
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from kubetune_trainer.builtin import builtin_model_dir

    run = args.run
    for needed in ("adapter", "merged", "onnx", "base-onnx"):
        if not (run / needed).is_dir():
            raise SystemExit(f"{run / needed} is missing: run `make run` first")
    args.work.mkdir(parents=True, exist_ok=True)
    adapters = variants(run / "adapter", args.work, args.adapters)
    names = ["quickstart", *(f"variant-{i}" for i in range(1, args.adapters))]
    modules = ["--lora-modules", *(f"{n}={a}" for n, a in zip(names, adapters, strict=True))]
    served, base = run / "onnx", run / "base-onnx"
    if not args.skip_accuracy:
        examples = load_chat_examples(TEST)
        fp32_base = export(builtin_model_dir("smollm2-135m-instruct"), args.work / "base-fp32",
                           "FP32")
        fp32_merged = export(run / "merged", args.work / "merged-fp32", "FP32")
        compare_accuracy("FP32", fp32_merged, fp32_base, run / "adapter", examples)
        compare_accuracy("served precision", served, base, run / "adapter", examples)

    # Memory: each server after answering one request per model it serves.
    memory: dict[str, float] = {}
    for label, model_dir, extra, models in (
        ("base alone", base, [], [base.name]),
        (f"base + {args.adapters} adapters", base, modules, names),
        ("one merged fine-tune", served, [], [default_served_name(served)]),
    ):
        url, process = serve(model_dir, args.tokens, *extra)
        try:
            for model in models:
                stream_once(url, model, PROMPTS[0], 8)
            memory[label] = resident_mb(process)
        finally:
            stop(process)

    # Speed: both servers up, each idle while the other is timed, interleaved rounds.
    merged_url, merged_process = serve(served, args.tokens)
    shared_url, shared_process = serve(base, args.tokens, *modules)
    timings: dict[str, list[float]] = {key: [] for key in (
        "merged single", "adapter single", "base single (adapters loaded)",
        "merged aggregate", "adapters aggregate (mixed)")}
    try:
        for url, model in ((merged_url, default_served_name(served)), (shared_url, names[0])):
            stream_once(url, model, PROMPTS[0], 8)
        for _ in range(args.rounds):
            timings["merged single"].append(
                single_decode(merged_url, default_served_name(served), args.tokens))
            timings["adapter single"].append(single_decode(shared_url, names[0], args.tokens))
            timings["base single (adapters loaded)"].append(
                single_decode(shared_url, base.name, args.tokens))
            timings["merged aggregate"].append(
                mixed_aggregate(merged_url, [default_served_name(served)], args.tokens))
            timings["adapters aggregate (mixed)"].append(
                mixed_aggregate(shared_url, names, args.tokens))
    finally:
        stop(merged_process, shared_process)

    print(machine())
    print("memory (resident, MB): " + ", ".join(f"{k} {v:.0f}" for k, v in memory.items()))
    print(f"{args.adapters} merged servers would hold "
          f"{args.adapters * memory['one merged fine-tune']:.0f} MB; one server with "
          f"{args.adapters} adapters holds {memory[f'base + {args.adapters} adapters']:.0f} MB "
          f"(+{memory[f'base + {args.adapters} adapters'] - memory['base alone']:.0f} MB "
          "over the base alone)")
    print(f"speed: {args.tokens} greedy tokens, median of {args.rounds} interleaved rounds")
    medians = {k: statistics.median(v) for k, v in timings.items()}
    for key, value in medians.items():
        print(f"  {key:34} {value:8.1f} tok/s")
    single = medians["adapter single"] / medians["merged single"]
    aggregate = medians["adapters aggregate (mixed)"] / medians["merged aggregate"]
    print(f"adapter / merged: single-stream {single:.2f}x, {STREAMS}-stream aggregate "
          f"{aggregate:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
