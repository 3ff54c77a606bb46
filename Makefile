# emseg: the two quick-start commands and their parts.
#   make demo   set up .venv and segment the bundled sample stack with the bundled model -> out/demo/
#   make test   set up .venv (with the dev, napari and export extras) and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision must come as a matching pair (smp needs torchvision).
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: demo test bench-quick setup setup-dev clean

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

bench-quick: setup-dev
	$(BIN)/python benchmarks/bench_inference.py --quick

clean:
	rm -rf out .pytest_cache
