# emseg: the two quick-start commands and their parts.
#   make demo   set up .venv and segment the bundled sample stack with the bundled model -> out/demo/
#   make test   set up .venv (with the dev, napari and export extras) and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision must come as a matching pair (smp needs torchvision).
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: demo test test-io-latest bench-quick setup setup-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	touch $@

setup: $(VENV)/.torch
	$(BIN)/python -m pip install --quiet -e .

setup-dev: $(VENV)/.torch
	$(BIN)/python -m pip install --quiet -e ".[dev,napari,export]"

demo: setup
	$(BIN)/emseg predict default data_samples/sample_stack.tif -o out/demo
	@echo "Masks and the overlay preview are in out/demo/"

# GUI tests need a display: use a virtual X server when xvfb-run is installed (.ci/run installs it).
XVFB := $(shell command -v xvfb-run >/dev/null 2>&1 && echo "xvfb-run -a -s '-screen 0 1600x1000x24'")

test: setup-dev
	$(if $(XVFB),QT_QPA_PLATFORM=xcb $(XVFB),QT_QPA_PLATFORM=offscreen) $(BIN)/python -m pytest $(PYTEST_ARGS)

# The I/O layer against the newest tifffile, which needs Python >= 3.12 (Python 3.11 stops at tifffile
# 2026.3.3, before the API changes of 2026.5.2). Torch is not installed there: only tests/test_io.py runs.
# PY312: the first Python >= 3.12 among python3.13, python3.12 and pyenv's versions.
PY312 ?= $(shell for p in python3.13 python3.12 $$(pyenv root 2>/dev/null)/versions/3.1[2-9]*/bin/python; do \
	$$p -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null && { command -v $$p || echo $$p; } && break; done)
IO_VENV := .venv-io312

test-io-latest:
ifeq ($(PY312),)
	@echo "test-io-latest: skipped: no Python >= 3.12 found (PY312=/path/to/python names one)"
else
	test -x $(IO_VENV)/bin/python || $(PY312) -m venv $(IO_VENV)
	$(IO_VENV)/bin/python -m pip install --quiet --upgrade numpy tifffile imagecodecs pillow matplotlib hyperspy pytest "dask[array]"
	$(IO_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_io.py
endif

bench-quick: setup-dev
	$(BIN)/python benchmarks/bench_inference.py --quick

clean:
	rm -rf out .pytest_cache
