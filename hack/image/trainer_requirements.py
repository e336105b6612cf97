"""The third-party packages of the trainer image, for one TORCH_VARIANT: what the two
distributions require (the control plane's dependencies; the data plane's, with its `trainer`
and `serve` extras), not the distributions themselves.

The `serve` extra names ONNX Runtime's CPU builds, `onnxruntime` and `onnxruntime-genai`, which
the dev venv and the `cpu` variant install. They have no CUDA execution provider, so a CUDA
export could not run on them: the `cuda` variant installs their CUDA builds instead,
`onnxruntime-gpu` and `onnxruntime-genai-cuda`. Each build is its own distribution but installs
the same module (`import onnxruntime`), so the two must never meet in one environment (the
last one installed would overwrite the other's files): install-trainer.sh installs these
requirements, then the distributions without their dependencies.

install-trainer.sh runs this with the venv's Python; only the standard library.

    python trainer_requirements.py SOURCE_DIR cuda|cpu    # one requirement per line
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

VARIANTS = ("cuda", "cpu")
CUDA_BUILDS = {"onnxruntime": "onnxruntime-gpu", "onnxruntime-genai": "onnxruntime-genai-cuda"}
"""The CPU build each CUDA build replaces in the `cuda` variant (both pinned in
requirements/constraints.txt)."""
_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)(.*)", re.S)


def for_variant(requirement: str, variant: str) -> str:
    """A requirement as `variant` installs it: an ONNX Runtime CPU build becomes its CUDA build
    (same version bounds) in the `cuda` variant; everything else stays."""
    match = _NAME.match(requirement)
    if variant != "cuda" or match is None:
        return requirement
    name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
    return CUDA_BUILDS[name] + match.group(2) if name in CUDA_BUILDS else requirement


def requirements(source_dir: Path, variant: str) -> list[str]:
    if variant not in VARIANTS:
        raise SystemExit(f"trainer_requirements.py: the variant must be cuda or cpu, not "
                         f"{variant!r}")
    control = tomllib.loads((source_dir / "pyproject.toml").read_text())["project"]
    data = tomllib.loads((source_dir / "trainer-image/pyproject.toml").read_text())["project"]
    listed = [*control["dependencies"], *data["dependencies"],
              *data["optional-dependencies"]["trainer"],
              *data["optional-dependencies"]["serve"]]
    return [for_variant(r, variant) for r in listed if not r.startswith("kubetune")]


if __name__ == "__main__":
    print("\n".join(requirements(Path(sys.argv[1]), sys.argv[2])))
