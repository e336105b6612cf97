"""The quickstart on the built-in model and on its weights repacked into Phi-3's, Qwen2's and
Mistral's layouts (tests/trainer/families/repack.py): held-out accuracy and training speed per
family, in one run on one machine.

    python bench/families.py [--output runs/families] [--precision FP32] [--layouts phi3 ...]

Each layout computes the built-in model's function with another family's modules (packed
`qkv_proj`/`gate_up_proj`, q/k/v biases, a sliding window), so the same quickstart
(examples/quickstart.yaml: 75 LoRA steps on 600 kubectl requests, `all-linear`) should reach
the same accuracy. Each run is `kubetune run` on the manifest with `model.source` pointing at
the layout's directory and the given serving precision (FP32 by default: what is compared is
training, not quantization). Prints validation exact match, test-split exact match through the
served model (100 requests), training tokens/s and each against the built-in model's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def run_quickstart(name: str, source: str, output: Path, precision: str) -> dict:
    manifest = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    manifest["metadata"]["name"] = f"quickstart-{name}"
    manifest["spec"]["model"]["source"] = source
    manifest["spec"]["serving"]["precision"] = precision
    output.mkdir(parents=True, exist_ok=True)
    path = output / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    run_dir = output / name
    result = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "run", str(path), "--output", str(run_dir),
         "--no-serve"],
        cwd=REPO, text=True, capture_output=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{name}: kubetune run failed\n{result.stdout[-3000:]}"
                         f"{result.stderr[-3000:]}")
    return dict(json.loads((run_dir / "report.json").read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=REPO / "runs" / "families")
    parser.add_argument("--precision", default="FP32")
    parser.add_argument("--layouts", nargs="+", default=None,
                        help="the repacked layouts to run beside the built-in model (default: all)")
    args = parser.parse_args()

    from kubetune_trainer.builtin import builtin_model_dir
    from tests.trainer.families.repack import LAYOUTS, repack

    builtin = builtin_model_dir("smollm2-135m-instruct")
    sources = {"builtin (llama)": "builtin://smollm2-135m-instruct"}
    for layout in args.layouts or LAYOUTS:
        sources[layout] = f"file://{repack(builtin, layout, args.output / 'models' / layout)}"
    reports = {name: run_quickstart(name.split()[0], source, args.output, args.precision)
               for name, source in sources.items()}

    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs; python {platform.python_version()}")
    reference = reports["builtin (llama)"]
    header = f"{'layout':<16} {'validation':>10} {'test':>8} {'tokens/s':>9} {'vs builtin':>10}"
    print(header)
    for name, report in reports.items():
        test = report["test"]["fineTuned"]
        speed = report["tokensPerSecond"] / reference["tokensPerSecond"]
        print(f"{name:<16} {report['accuracy']:>10.3f} {test['correct']:>4}/{test['total']:<3} "
              f"{report['tokensPerSecond']:>9.1f} {speed:>10.2f}")


if __name__ == "__main__":
    main()
