# Two commands for a fresh machine: `make demo` and `make test`. Each sets itself up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo lint bench clean

setup: $(STAMP)

# torch==2.13.0 first: it is the CPU build on these machines; a plain `torch`
# would pull a CUDA build of several GB.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The Keras-native tests run once per backend, each in its own process (the torch
# run is part of the main suite); --confcutdir keeps the torch-importing tests/conftest.py out.
test: setup
	KERAS_BACKEND=torch $(BIN)/python -m pytest -q -n 2 tests
	KERAS_BACKEND=tensorflow $(BIN)/python -m pytest -q -n 0 --confcutdir=tests/keras_native tests/keras_native
	KERAS_BACKEND=jax $(BIN)/python -m pytest -q -n 0 --confcutdir=tests/keras_native tests/keras_native

# --overwrite: `make demo` reruns the same demo into the same folder.
demo: setup
	$(BIN)/sparsecraft demo --overwrite

lint: setup
	$(BIN)/ruff check src tests benchmarks

bench: setup
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(BIN)/sparsecraft bench

clean:
	rm -rf $(VENV) sparsecraft-demo
