"""Trim an installed PyPI torch to what a machine without a GPU loads: drop, from its metadata,
the requirements none of torch's libraries link against, and print the rest.

PyPI has no CPU-only torch for Linux: its wheel links libtorch_cuda/libtorch_python against
CUDA's runtime, cuBLAS, cuDNN, NCCL... (the nvidia-* wheels), and `import torch` fails
without them. What it does not link against, and what is dropped here:
- triton (~1 GB): compiles GPU kernels for torch.compile on CUDA;
- cuda-bindings (and its cuda-pathfinder): Python bindings to the CUDA driver;
- cuda-toolkit's `cusolver` extra (nvidia-cusolver, ~270 MB): only libtorch_cuda_linalg,
  loaded on the first CUDA linear-algebra call, needs it.

install-trainer.sh runs this with the venv's Python when TORCH_VARIANT=cpu, right after
`pip install --no-deps torch`, then installs what it prints. The installed METADATA is
rewritten, not only read: pip's resolver follows an installed torch's requirements whenever a
later install depends on torch (deepspeed, peft, accelerate, the trainer) and would fetch the
dropped packages then.

    python torch_cpu.py        # prints one requirement per line
"""

from __future__ import annotations

import re
from importlib.metadata import distribution
from pathlib import Path

DROPPED = {"triton", "cuda-bindings"}
DROPPED_EXTRAS = {"cuda-toolkit": {"cusolver"}}
_REQUIREMENT = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?(.*)", re.S)


def cpu_requirement(requirement: str) -> str | None:
    """A Requires-Dist value as a machine without a GPU needs it; None: not at all."""
    match = _REQUIREMENT.match(requirement)
    if not match:
        return requirement
    name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
    if name in DROPPED:
        return None
    extras = [extra.strip() for extra in (match.group(2) or "").split(",") if extra.strip()]
    dropped = DROPPED_EXTRAS.get(name, set())
    if not dropped & set(extras):
        return requirement
    kept = ",".join(extra for extra in extras if extra not in dropped)
    return match.group(1) + (f"[{kept}]" if kept else "") + match.group(3)


def cpu_metadata(metadata: str) -> tuple[str, list[str]]:
    """A wheel's METADATA with its Requires-Dist headers trimmed by cpu_requirement, and the
    requirements kept that apply without an extra (nothing here asks for torch's extras)."""
    headers, blank, body = metadata.partition("\n\n")  # the body is the long description
    lines, requirements = [], []
    for line in headers.splitlines(keepends=True):
        if line.startswith("Requires-Dist:"):
            kept = cpu_requirement(line.partition(":")[2].strip())
            if kept is None:
                continue
            line = f"Requires-Dist: {kept}\n"
            if not re.search(r"\bextra\s*==", kept):
                requirements.append(kept)
        lines.append(line)
    return "".join(lines) + blank + body, requirements


def main() -> None:
    torch = distribution("torch")
    [metadata] = [Path(str(torch.locate_file(f))) for f in torch.files or []
                  if f.name == "METADATA" and f.parent.name.endswith(".dist-info")]
    text, requirements = cpu_metadata(metadata.read_text(encoding="utf-8"))
    metadata.write_text(text, encoding="utf-8")
    print("\n".join(requirements))


if __name__ == "__main__":
    main()
