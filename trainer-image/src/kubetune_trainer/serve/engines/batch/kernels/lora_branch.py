"""Finding or building the LoraBranch library (`lora_branch.c`).

The library is built once per source: the image builds it when it installs the package
(`python -m kubetune_trainer.serve.engines.batch.kernels`, into the package's directory), and
elsewhere it is built on first use into KubeTune's cache (~0.5 s with a C compiler). Without a
compiler `library()` says so and returns None, and the graph keeps its four standard nodes per
branch: the same answers, slower (bench/RESULTS.md). `lora` decides where the op is used.
"""


from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from kubetune.api.dataplane import cache_root

HERE = Path(__file__).parent
SOURCE = HERE / "lora_branch.c"
INCLUDE = HERE / "include"  # ONNX Runtime's C API headers (API version 24), as published
DOMAIN = "kubetune"
OP = "LoraBranch"
FLAGS = ("-O3", "-fPIC", "-shared", "-fno-math-errno", "-Wall")
"""No -ffast-math: a row's sums keep their order, so its answer is the same in any batch."""

log = logging.getLogger(__name__)


class BuildError(RuntimeError):
    """The C compiler refused the kernel: its message, for the log."""


def library_name() -> str:
    """The built library's file name: a hash of what it is built from."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    for header in sorted(INCLUDE.glob("*.h")):
        digest.update(header.read_bytes())
    digest.update(" ".join(FLAGS).encode())
    return f"liblora_branch-{digest.hexdigest()[:16]}.so"


def cache_dir() -> Path:
    """Where libraries built on first use live: beside the converted models (`cache_root`)."""
    return cache_root() / "kernels"


def compiler() -> str | None:
    """The C compiler to build with: $CC, else the first of cc, gcc, clang on PATH."""
    names = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    return next((found for name in names if (found := shutil.which(name))), None)


def build(directory: Path) -> Path:
    """Compile the library into `directory` (written under a temporary name and renamed: a
    concurrent build or reader never sees half a file). Raises BuildError."""
    cc = compiler()
    if cc is None:
        raise BuildError("no C compiler (cc, gcc or clang; or set CC)")
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / library_name()
    with tempfile.TemporaryDirectory(dir=directory) as work:
        built = Path(work) / target.name
        result = subprocess.run(
            [cc, *FLAGS, f"-I{INCLUDE}", str(SOURCE), "-o", str(built)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise BuildError(f"{cc} failed: {result.stderr.strip()[-2000:]}")
        built.replace(target)
    return target


@cache
def library() -> Path | None:
    """The LoraBranch library, built if need be; None (logged once) where it cannot be."""
    for directory in (HERE, cache_dir()):
        found = directory / library_name()
        if found.is_file():
            return found
    try:
        return build(cache_dir())
    except (BuildError, OSError) as error:
        log.warning("LoRA branches run as standard ONNX nodes (slower): %s", error)
        return None


def main() -> int:
    """Build the library beside this package (the image does, at install; `python -m`)."""
    print(build(HERE))
    return 0
