"""What constrained decoding costs: KubeTune's server (INT4 export of the built-in model, the
default `batch` engine) answering the same prompts as free text and under a `response_format`
JSON schema, in interleaved rounds in one run on one machine.

    python bench/structured_output.py [--tokens 64] [--rounds 3] [--work /tmp/kubetune-bench]

Prints, free and constrained: single-stream decode tokens/s (median over rounds) and TTFT, the
8-stream aggregate, and the constrained/free ratios. Two schemas: a long string (the mask is
cheap inside a string) and an array of small objects (a structural token every few tokens,
where the mask costs most). The answers run to `max_tokens`, so both sides decode as many
tokens. A benchmark, not a test: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from inference import PROMPTS, STREAMS, export, free_port, machine, stream_once

STORY = {
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 2000}},
    "required": ["story"],
}
RECORDS = {
    "type": "array",
    "minItems": 100,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 10},
            "age": {"type": "integer"},
            "pet": {"enum": ["cat", "dog", "fish"]},
        },
        "required": ["name", "age", "pet"],
        "additionalProperties": False,
    },
}
FORMATS: dict[str, dict[str, Any] | None] = {
    "free text": None,
    "json string": {"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "story", "schema": STORY}}},
    "json records": {"response_format": {"type": "json_schema",
                                         "json_schema": {"name": "records", "schema": RECORDS}}},
}


def serve(model_dir: Path, tokens: int, *extra: str) -> tuple[str, subprocess.Popen[bytes]]:
    """KubeTune's server on `model_dir` (`extra`: more flags), once it is ready."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "kubetune_trainer", "serve", "--model", str(model_dir),
               "--host", "127.0.0.1", "--port", str(port), "--max-concurrency", str(STREAMS),
               "--max-queue", "32", "--max-tokens", str(tokens), *extra]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            ready = httpx.get(url + "/readyz", timeout=2)
            if ready.status_code == 200:
                return url, process
            if ready.json().get("status") == "failed":  # the model will never load
                process.kill()
                raise RuntimeError(f"{model_dir}: {ready.json().get('error')}")
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise RuntimeError("server exited")
        time.sleep(0.2)


def measure(run: Callable[[str], dict[str, float]]) -> dict[str, float]:
    single = [run(prompt) for prompt in PROMPTS]
    started = time.perf_counter()
    with ThreadPoolExecutor(STREAMS) as pool:
        runs = list(pool.map(lambda i: run(PROMPTS[i % len(PROMPTS)]), range(STREAMS)))
    wall = time.perf_counter() - started
    return {
        "decode": sum(r["tokens"] - 1 for r in single) / sum(r["decode"] for r in single),
        "ttft": statistics.median(r["ttft"] for r in single),
        "aggregate": sum(r["tokens"] for r in runs) / wall,
        "tokens": statistics.mean(r["tokens"] for r in single),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/kubetune-bench"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from kubetune_trainer.builtin import builtin_model_dir

    model_dir = export(builtin_model_dir("smollm2-135m-instruct"), args.work / "int4", "INT4")
    url, process = serve(model_dir, args.tokens)
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in FORMATS}
    try:
        stream_once(url, model_dir.name, PROMPTS[0], 8)  # warm the HTTP path
        for _ in range(args.rounds):
            for name, extra in FORMATS.items():  # interleaved: drift hits every format alike
                rounds[name].append(measure(
                    lambda prompt, extra=extra: stream_once(  # type: ignore[misc]
                        url, model_dir.name, prompt, args.tokens, extra)))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(120)
    medians = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
               for name, runs in rounds.items()}
    free = medians["free text"]
    print(machine())
    print(f"INT4 built-in model, batch engine, {args.tokens} tokens, median of {args.rounds}")
    print(f"{'format':14} {'tokens':>6} {'decode tok/s':>12} {'x free':>6} {'TTFT ms':>8} "
          f"{f'{STREAMS} streams tok/s':>16} {'x free':>6}")
    for name, m in medians.items():
        print(f"{name:14} {m['tokens']:6.0f} {m['decode']:12.1f}"
              f" {m['decode'] / free['decode']:6.2f} {m['ttft'] * 1e3:8.0f} {m['aggregate']:16.1f}"
              f" {m['aggregate'] / free['aggregate']:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
