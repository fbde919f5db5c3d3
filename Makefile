# The two commands of the README: `make demo` (the main job on the embedded data) and `make test`.
# Both set everything up from a fresh clone: `make setup` creates .venv when it is missing.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The torch build to install into .venv. The default is the CUDA 13.0 build that also runs on a CPU-only machine;
# GPU machines may override it (setup.py itself only requires torch>=2.4).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# nvcc lives here on our machines; torch's own guess fails to link -lcudart.
CUDA_HOME ?= /usr/local/cuda
export CUDA_HOME
MAX_JOBS ?= 2
export MAX_JOBS
DATA ?= data/embedded
# `make demo PIPELINE=continuous`: the KL tokenizer + DiT pipeline (configs/demo_continuous.yaml)
PIPELINE ?= vq
ifeq ($(PIPELINE),continuous)
DEMO_CONFIG := configs/demo_continuous.yaml
RUN_DIR ?= runs/demo_continuous
else ifeq ($(PIPELINE),vq)
DEMO_CONFIG := configs/demo.yaml
RUN_DIR ?= runs/demo
else
$(error PIPELINE=$(PIPELINE): must be vq (the default) or continuous)
endif
PYTEST_ARGS ?=
# extra pipeline flags, e.g. `make demo DEMO_ARGS="--seeds 5 --post-seeds 3"` (README, "make demo")
DEMO_ARGS ?=

.PHONY: setup test demo data bench kernel-report clean

# Re-run the editable install (and so the extension build) whenever the build inputs change.
$(VENV)/.installed: setup.py pyproject.toml $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip wheel "setuptools>=64" ninja
	$(PIP) install --quiet $(TORCH_SPEC)
	# --no-build-isolation: build the extension against the torch just installed, not a fresh download.
	$(PIP) install --no-build-isolation -e ".[test]"
	touch $@

# The oldest Triton GPU users have (the version beside torch 2.11), only for the kernel compile check
# (tests/benchmarks, benchmarks/kernel_report.py --triton-dir .triton36): a separate folder, never imported by the
# package (pip picks the wheel of the venv's Python; cp311 here).
TRITON_OLD ?= 3.6.0
TRITON_OLD_DIR ?= .triton36
$(TRITON_OLD_DIR)/.installed: $(VENV)/.installed
	$(PIP) install --quiet --upgrade --target $(TRITON_OLD_DIR) --no-deps triton==$(TRITON_OLD)
	touch $@

setup: $(VENV)/.installed $(TRITON_OLD_DIR)/.installed

data: setup
	$(PY) -m tokpost_fast.data.embedded --out data/embedded

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/quantize_bench.py --quick

# Compile every Triton kernel variant for sm_90 / sm_80 with both Triton versions; no GPU needed.
kernel-report: setup
	$(PY) benchmarks/kernel_report.py --triton-dir $(TRITON_OLD_DIR)

# main -> gen -> cache -> post | control -> evaluate (held-out images) -> RUN_DIR/report.md (tokpost_fast/pipeline.py);
# builds the embedded data when DATA is the missing data/embedded; a re-run skips the finished stages.
demo: setup
	$(PY) -m tokpost_fast.pipeline --config $(DEMO_CONFIG) --run-dir $(RUN_DIR) --data $(DATA) $(DEMO_ARGS)

clean:
	rm -rf build *.egg-info tokpost_fast/_C*.so runs
