"""KubeTune's server against llama.cpp's `llama-server`, the server a user would pick for CPU
serving, on the same weights, cores and streaming client, in interleaved rounds of one run.

    python bench/serving_peers.py [--tokens 64] [--rounds 3] [--work /tmp/kubetune-bench]
                                  [--precision INT4] [--quantization RTN]

llama-server is built once into the cache from the llama.cpp sources that PyPI's
llama-cpp-python sdist carries (`pip download --no-binary :all:`, then cmake on
`vendor/llama.cpp` with the server on, curl off, native CPU flags: about 8 minutes on 2
cores), and serves the built-in model's own Q4_1 GGUF with `-t <cores> -np 8` (continuous
batching over 8 slots). KubeTune serves its export of the same weights (default INT4, batch
engine). Both run at once and idle while the other is measured; the rounds alternate, so
drift on a shared machine hits both alike. Prints single-stream decode tokens/s, TTFT and the
8-stream aggregate for each (medians over rounds) and the ratios. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from inference import PROMPTS, STREAMS, free_port, machine, stream_once
from structured_output import measure, serve

LLAMA_CPP_PYTHON = "0.3.36"


def cache_dir() -> Path:
    from kubetune.api.dataplane import cache_root

    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), "")
    # Built with native CPU flags: a different CPU gets its own build.
    key = hashlib.sha256(flags.encode()).hexdigest()[:12]
    return cache_root() / f"llama.cpp-{LLAMA_CPP_PYTHON}-{key}"


def llama_server() -> Path:
    """llama-server, built once per version and CPU into the cache."""
    target = cache_dir() / "llama-server"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llama-build-") as scratch:
        work = Path(scratch)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--no-binary", ":all:", f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
                        "-d", str(work)], check=True)
        archive = next(work.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as sdist:
            sdist.extractall(work, filter="data")
        source = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = work / "build"
        subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                        "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON",
                        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"], check=True)
        subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j",
                        str(os.cpu_count() or 1)], check=True)
        built = next(build.rglob("llama-server"))
        staged = target.with_suffix(".tmp")
        staged.write_bytes(built.read_bytes())
        staged.chmod(0o755)
        os.replace(staged, target)
        # Shared libraries (ggml, llama) the binary links to, beside it.
        for library in build.rglob("*.so*"):
            (target.parent / library.name).write_bytes(library.read_bytes())
    return target


def wait_ready(url: str, process: subprocess.Popen[bytes], path: str) -> None:
    while True:
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        time.sleep(0.2)


def start_llama(gguf: Path, tokens: int) -> tuple[str, subprocess.Popen[bytes]]:
    binary = llama_server()
    port = free_port()
    cores = os.cpu_count() or 1
    command = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               "-t", str(cores), "-tb", str(cores), "-np", str(STREAMS),
               "-c", str(STREAMS * (tokens + 128)), "--no-webui"]
    environment = {**os.environ, "LD_LIBRARY_PATH": str(binary.parent)}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=environment)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, process, "/health")
    return url, process


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/kubetune-bench"))
    parser.add_argument("--precision", default="INT4")
    parser.add_argument("--quantization")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from kubetune.local.processes import export_command
    from kubetune_trainer.builtin import builtin_model_dir, gguf_path

    name = f"{args.precision}-{args.quantization or 'default'}".lower()
    model_dir = args.work / name
    if not (model_dir / "export.json").is_file():
        subprocess.run(export_command(builtin_model_dir("smollm2-135m-instruct"), model_dir,
                                      args.precision, "CPU", args.quantization), check=True)
    servers: dict[str, tuple[str, subprocess.Popen[bytes], str]] = {}
    try:
        url, process = start_llama(gguf_path("smollm2-135m-instruct"), args.tokens)
        servers["llama.cpp llama-server (Q4_1 GGUF)"] = (url, process, "model")
        url, process = serve(model_dir, args.tokens)
        servers[f"KubeTune ({args.precision} {args.quantization or ''})".replace(" )", ")")] = (
            url, process, model_dir.name)
        rounds: dict[str, list[dict[str, float]]] = {label: [] for label in servers}
        for url, _, model in servers.values():
            stream_once(url, model, PROMPTS[0], 8)  # warm each HTTP path
        for _ in range(args.rounds):
            for label, (url, _, model) in servers.items():
                rounds[label].append(measure(
                    lambda prompt, url=url, model=model: stream_once(  # type: ignore[misc]
                        url, model, prompt, args.tokens)))
    finally:
        for _, process, _ in servers.values():
            process.send_signal(signal.SIGTERM)
            process.wait(120)
    medians = {label: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
               for label, runs in rounds.items()}
    llama, ours = medians.values()
    print(machine())
    print(f"{args.tokens} greedy tokens per request, median of {args.rounds} interleaved rounds")
    print(f"{'server':40} {'decode tok/s':>12} {'TTFT ms':>8} {f'{STREAMS} streams tok/s':>16}")
    for label, m in medians.items():
        print(f"{label:40} {m['decode']:12.1f} {m['ttft'] * 1e3:8.0f} {m['aggregate']:16.1f}")
    ratios: dict[str, Any] = {key: ours[key] / llama[key] for key in ("decode", "aggregate")}
    print(f"KubeTune / llama.cpp: single-stream decode {ratios['decode']:.2f}x, "
          f"{STREAMS}-stream aggregate {ratios['aggregate']:.2f}x, "
          f"TTFT {ours['ttft'] * 1e3:.0f} vs {llama['ttft'] * 1e3:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
