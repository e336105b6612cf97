#!/usr/bin/env bash
# Install the operator (`kubetune` with the `operator` extra: the control plane only, no
# trainer code) into a virtual environment.
# operator/Dockerfile runs this; tests/unit/test_images.py runs it too, into a fresh venv, so
# the image's install step is tested without a Docker engine.
#
#   hack/image/install-operator.sh VENV [SOURCE_DIR]
#
# VENV is created when missing (with $PYTHON, default python3). SOURCE_DIR is the repository
# root (default: this script's ../..). Versions come from requirements/constraints.txt, the
# same pins the tests run with. Extra pip flags (e.g. a local mirror) go in PIP_* variables.
set -euo pipefail

venv=${1:?usage: install-operator.sh VENV [SOURCE_DIR]}
source_dir=${2:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
python=${PYTHON:-python3}

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  -c "$source_dir/requirements/constraints.txt" "$source_dir[operator]"

# The entry point the image runs: fail the build, not the first pod start.
"$venv/bin/kubetune" --help >/dev/null
"$venv/bin/python" -c "import kopf, kubernetes, aiohttp, kubetune.api"
# The data plane is another distribution: the operator image must not carry it.
if "$venv/bin/python" -c "import kubetune_trainer" 2>/dev/null; then
  echo "install-operator.sh: kubetune_trainer is installed in the operator venv" >&2
  exit 1
fi
