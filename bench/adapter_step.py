"""The bare decode step of the batching engine with LoRA branches, against the same export's
graph without them (what a merged export's step costs: the same graph and weights' shapes).

    python bench/adapter_step.py --model EXPORT_DIR --adapter ADAPTER_DIR [--loaded 4]
                                 [--rounds 7] [--steps 64] [--prefill 200]

Every branch design (`lora.BranchDesign`) is built side by side in one process and run
interleaved, round by round (medians of the rounds' per-step means):
- `no branches`: the export as a server without adapters runs it;
- `nodes`: four standard ONNX nodes per branch (what runs without a C compiler);
- `kernel FP32` / `kernel INT8`: one LoraBranch node per branch, A and B in FP32 or INT8
  (`graph.branch_design` picks INT8 on a quantized base, FP32 on an FP32 one);
each with a base row (zero-width feeds), an adapter row (`--loaded` adapters loaded: copies of
ADAPTER_DIR, lora_B perturbed as bench/adapters.py does) and one row on each loaded adapter.
The ratio printed is against `no branches` with as many rows. Then each one-row variant's
prefill of a `--prefill`-token prompt (what its time to first token costs). A benchmark, not a
test.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from kubetune_trainer.serve.engines.batch.decoder import Decoder
from kubetune_trainer.serve.engines.batch.lora import AdapterWeights, BranchDesign


def variants(adapter: Path, work: Path, count: int) -> list[Path]:
    from safetensors.numpy import load_file, save_file

    made = [adapter]
    rng = np.random.default_rng(0)
    for index in range(1, count):
        target = work / f"variant-{index}"
        shutil.copytree(adapter, target)
        tensors = load_file(str(adapter / "adapter_model.safetensors"))
        for key, value in tensors.items():
            if "lora_B" in key:
                tensors[key] = value * (1 + 0.2 * rng.standard_normal(value.shape)).astype(
                    value.dtype
                )
        save_file(tensors, str(target / "adapter_model.safetensors"))
        made.append(target)
    return made


def time_steps(
    decoder: Decoder, rows: list[AdapterWeights | None], steps: int, prompt: list[int]
) -> float:
    """Mean seconds of a decode step for `rows` (each prefilled with `prompt`)."""
    cache = decoder.batch_cache(len(rows), 1024)
    last, present = decoder.prefill([prompt] * len(rows), rows, 1024, cache.logits_dtype)
    cache.reserve(0, len(prompt) + steps + 1)
    for row, adapter in enumerate(rows):
        cache.store(row, present, row, len(prompt), adapter)
    tokens = [int(t) for t in last.argmax(axis=1)]
    lengths = [len(prompt)] * len(rows)
    cache.step(tokens, lengths)  # binds
    started = time.perf_counter()
    for _ in range(steps):
        lengths = [n + 1 for n in lengths]
        logits = cache.step(tokens, lengths)
        tokens = [int(t) for t in logits.argmax(axis=1)]
    return (time.perf_counter() - started) / steps


DESIGNS = {
    "nodes": BranchDesign(),
    "kernel FP32": BranchDesign(fused=True),
    "kernel INT8": BranchDesign(fused=True, int8=True),
}


def time_prefill(decoder: Decoder, adapter: AdapterWeights | None, prompt: list[int]) -> float:
    """Seconds of one prefill of `prompt` on `adapter` (a request's time to its first token,
    less the server's share)."""
    started = time.perf_counter()
    decoder.prefill([prompt], [adapter], 1024, np.float32)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--loaded", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=200)
    args = parser.parse_args()
    plain = Decoder(args.model)
    runs: dict[str, tuple[Decoder, list[AdapterWeights | None]]] = {
        "no branches, 1 row": (plain, [None]),
        f"no branches, {args.loaded} rows": (plain, [None] * args.loaded),
    }
    with tempfile.TemporaryDirectory() as work:
        paths = variants(args.adapter, Path(work), args.loaded)
        for label, design in DESIGNS.items():
            decoder = Decoder(args.model, lora=True, design=design)
            loaded = [decoder.read_adapter(f"a{i}", p) for i, p in enumerate(paths)]
            megabytes = sum(a.nbytes for a in loaded) / 2**20
            print(f"{label}: {len(loaded)} adapters loaded, {megabytes:.1f} MB of fed weights")
            runs[f"{label}, base row"] = (decoder, [None])
            runs[f"{label}, adapter row"] = (decoder, [loaded[0]])
            runs[f"{label}, {len(loaded)} rows on {len(loaded)} adapters"] = (decoder, list(loaded))
    prompt = list(range(100, 140))
    long_prompt = list(range(100, 100 + args.prefill))
    prefills = {name: (decoder, rows[0]) for name, (decoder, rows) in runs.items()
                if len(rows) == 1}
    times: dict[str, list[float]] = {name: [] for name in runs}
    prefill_times: dict[str, list[float]] = {name: [] for name in prefills}
    for _ in range(args.rounds):
        for name, (decoder, rows) in runs.items():
            times[name].append(time_steps(decoder, rows, args.steps, prompt))
        for name, (decoder, adapter) in prefills.items():
            prefill_times[name].append(time_prefill(decoder, adapter, long_prompt))
    for name, values in times.items():
        rows = len(runs[name][1])
        reference = statistics.median(times[f"no branches, {rows} row{'s' * (rows > 1)}"])
        median = statistics.median(values)
        print(f"{name:40s} {1000 * median:7.3f} ms/step  {reference / median:5.2f}x")
    reference = statistics.median(prefill_times["no branches, 1 row"])
    for name, values in prefill_times.items():
        median = statistics.median(values)
        print(f"prefill {args.prefill} tokens, {name:24s} {1000 * median:7.1f} ms  "
              f"{reference / median:5.2f}x")


if __name__ == "__main__":
    main()
