"""Serving benchmark: the KubeTune server (INT4 and FP32 models from onnxruntime-genai's builder,
served by each engine: `batch`, the default, continuous batching on ONNX Runtime; `genai`,
one onnxruntime-genai generator per request) against PyTorch transformers `generate`, on the
same prompts, in one run on one machine.

    python bench/inference.py [--tokens 64] [--work /tmp/kubetune-bench] [--json out.json]
                              [--engines batch,genai]

Prints, per engine: single-stream decode tokens/s and time to first token (HTTP, streaming),
aggregate tokens/s with 8 concurrent streams, the ratios to PyTorch FP32, and the decode
ceiling set by memory bandwidth (weight bytes read per token against a measured copy bandwidth)
with the fraction of it reached. A benchmark, not a test: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from kubetune.local.processes import export_command

PROMPTS = (
    "Once upon a time, in a small village by the sea,",
    "The history of the printing press begins",
    "Here is a detailed explanation of how photosynthesis works:",
    "def quicksort(items):\n",
)
STREAMS = 8


def machine() -> dict[str, Any]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory = next(
        (
            int(line.split()[1]) // 1024
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        ),
        0,
    )
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memoryMiB": memory,
        "loadAverage": os.getloadavg(),
        "python": platform.python_version(),
    }


def memory_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a large numpy copy (read + write counted), best of `repeats`."""
    source = np.ones(megabytes * (1 << 20) // 8)
    target = np.empty_like(source)
    best = min(_timed(lambda: np.copyto(target, source)) for _ in range(repeats))
    return 2 * source.nbytes / best


def _timed(action: Any) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def weight_bytes_per_token(model_dir: Path) -> int:
    """Initializer bytes a decode step reads: every weight except the embedding table (one row
    is gathered) and the RoPE caches (one row each)."""
    import onnx

    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    total = 0
    for tensor in graph.initializer:
        if (
            "embed_tokens" in tensor.name
            or "cos_cache" in tensor.name
            or "sin_cache" in tensor.name
        ):
            continue
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        total += int(np.prod(tensor.dims)) * itemsize
    return total


def export(source: Path, output: Path, precision: str) -> Path:
    report = output / "export.json"
    if report.is_file() and json.loads(report.read_text()).get("ok"):
        return output
    subprocess.run(export_command(source, output, precision, "CPU"), check=True)
    return output


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stream_once(
    url: str, model: str, prompt: str, tokens: int, extra: dict[str, Any] | None = None
) -> dict[str, float]:
    """One greedy streaming completion; `extra` adds request fields (`response_format`)."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(extra or {}),
    }
    start = time.perf_counter()
    first = last = None
    generated = 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                generated = event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["text"]:
                last = time.perf_counter()
                first = first or last
    assert first is not None and last is not None
    return {
        "ttft": first - start,
        "tokens": generated,
        "decode": last - first,
        "total": time.perf_counter() - start,
    }


def bench_server(model_dir: Path, tokens: int, engine: str) -> dict[str, float]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kubetune_trainer",
            "serve",
            "--model",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-concurrency",
            str(STREAMS),
            "--max-queue",
            "32",
            "--max-tokens",
            str(tokens),
            "--engine",
            engine,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None:
                raise RuntimeError("server exited")
            time.sleep(0.2)
        name = model_dir.name
        stream_once(url, name, PROMPTS[0], 8)  # warm the HTTP path
        single = [stream_once(url, name, p, tokens) for p in PROMPTS]
        started = time.perf_counter()
        with ThreadPoolExecutor(STREAMS) as pool:
            runs = list(
                pool.map(
                    lambda i: stream_once(url, name, PROMPTS[i % len(PROMPTS)], tokens),
                    range(STREAMS),
                )
            )
        wall = time.perf_counter() - started
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(120)
    return {
        "decodeTokensPerSecond": sum(r["tokens"] - 1 for r in single)
        / sum(r["decode"] for r in single),
        "ttftSeconds": statistics.median(r["ttft"] for r in single),
        "aggregateTokensPerSecond": sum(r["tokens"] for r in runs) / wall,
        "singleStreamEndToEndTokensPerSecond": sum(r["tokens"] for r in single)
        / sum(r["total"] for r in single),
    }


def _generate_seconds(model: Any, inputs: Any, tokens: int, kwargs: dict[str, Any]) -> float:
    start = time.perf_counter()
    model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, **kwargs)
    return time.perf_counter() - start


def bench_pytorch(model_dir: Path, tokens: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ttfts, decodes = [], []
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt")
            kwargs = {"do_sample": False, "pad_token_id": tokenizer.eos_token_id}
            first = _generate_seconds(model, ids, 1, kwargs)
            full = _generate_seconds(model, ids, tokens, kwargs)
            ttfts.append(first)
            decodes.append((tokens - 1) / (full - first))
        batch = tokenizer(
            [PROMPTS[i % len(PROMPTS)] for i in range(STREAMS)],
            return_tensors="pt",
            padding=True,
            padding_side="left",
        )
        wall = _timed(
            lambda: model.generate(
                **batch,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
        )
    return {
        "decodeTokensPerSecond": statistics.mean(decodes),
        "ttftSeconds": statistics.median(ttfts),
        "aggregateTokensPerSecond": STREAMS * tokens / wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path("/tmp/kubetune-bench"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--engines", default="batch,genai", help="server engines to measure")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from kubetune_trainer.builtin import builtin_model_dir

    source = builtin_model_dir("smollm2-135m-instruct")
    results: dict[str, Any] = {"machine": machine(), "tokens": args.tokens}
    bandwidth = memory_bandwidth()
    results["memoryBandwidthGBps"] = bandwidth / 1e9
    engines: dict[str, dict[str, float]] = {}
    for precision in ("INT4", "FP32"):
        model_dir = export(source, args.work / precision.lower(), precision)
        per_token = weight_bytes_per_token(model_dir)
        for engine in args.engines.split(","):
            measured = bench_server(model_dir, args.tokens, engine)
            measured["weightBytesPerToken"] = per_token
            measured["ceilingTokensPerSecond"] = bandwidth / per_token
            measured["fractionOfCeiling"] = measured["decodeTokensPerSecond"] / (
                bandwidth / per_token
            )
            engines[f"served {precision} ({engine})"] = measured
    engines["PyTorch FP32 generate"] = bench_pytorch(source, args.tokens)
    baseline = engines["PyTorch FP32 generate"]["decodeTokensPerSecond"]
    for measured in engines.values():
        measured["speedupVsPytorch"] = measured["decodeTokensPerSecond"] / baseline
        measured["aggregateOverSingle"] = (
            measured["aggregateTokensPerSecond"] / measured["decodeTokensPerSecond"]
        )
    results["engines"] = engines
    print(json.dumps(results["machine"]))
    print(
        f"memory bandwidth (numpy copy): {bandwidth / 1e9:.1f} GB/s; {args.tokens} tokens/request"
    )
    header = (
        f"{'engine':28} {'decode tok/s':>12} {'TTFT ms':>8} {'x PyTorch':>9} "
        f"{f'{STREAMS} streams tok/s':>16} {'agg/single':>10} {'ceiling':>8} {'of ceil':>7}"
    )
    print(header)
    for name, m in engines.items():
        ceiling = m.get("ceilingTokensPerSecond")
        print(
            f"{name:28} {m['decodeTokensPerSecond']:12.1f} {m['ttftSeconds'] * 1e3:8.0f} "
            f"{m['speedupVsPytorch']:9.2f} {m['aggregateTokensPerSecond']:16.1f} "
            f"{m['aggregateOverSingle']:10.2f} "
            + (f"{ceiling:8.0f} {m['fractionOfCeiling']:7.0%}" if ceiling else f"{'-':>8} {'-':>7}")
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
