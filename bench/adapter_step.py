"""The bare decode step of the batching engine with LoRA branches, against the same export's
graph without them (what a merged export's step costs: the same graph and weights' shapes).

    python bench/adapter_step.py --model EXPORT_DIR --adapter ADAPTER_DIR [--loaded 4]
                                 [--rounds 5] [--steps 64]

Variants, interleaved round by round (medians of the rounds' per-step means), one row:
- `no branches`: the export as a server without adapters runs it;
- `branches, base row`: the graph with fed branches, the row on the base (zero-width feeds);
- `branches, adapter row`: the same graph, `--loaded` adapters loaded (copies of ADAPTER_DIR,
  lora_B perturbed as bench/adapters.py does), the row on one of them;
- `branches, 4 rows on 4 adapters`: every loaded adapter in use at once, against 4 rows of the
  graph without branches.
A benchmark, not a test.
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
from kubetune_trainer.serve.engines.batch.lora import AdapterWeights


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--loaded", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()
    plain = Decoder(args.model)
    branched = Decoder(args.model, lora=True)
    with tempfile.TemporaryDirectory() as work:
        paths = variants(args.adapter, Path(work), args.loaded)
        loaded = [branched.read_adapter(f"a{i}", p) for i, p in enumerate(paths)]
    megabytes = sum(a.nbytes for a in loaded) / 2**20
    print(f"{len(loaded)} adapters loaded: {megabytes:.1f} MB of fed weights")
    prompt = list(range(100, 140))
    runs = {
        "no branches (merged-equivalent graph)": (plain, [None]),
        "branches, base row": (branched, [None]),
        "branches, adapter row": (branched, [loaded[0]]),
        f"no branches, {len(loaded)} rows": (plain, [None] * len(loaded)),
        f"branches, {len(loaded)} rows on {len(loaded)} adapters": (branched, list(loaded)),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (decoder, rows) in runs.items():
            times[name].append(time_steps(decoder, rows, args.steps, prompt))
    reference = statistics.median(times["no branches (merged-equivalent graph)"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:45s} {1000 * median:7.3f} ms/step  {reference / median:5.2f}x")


if __name__ == "__main__":
    main()
