# Two commands set up a fresh machine: `make demo` runs the main job, `make test` the test suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@# The CPU build of torch on this disk; a user with a GPU installs their CUDA build first.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,slurm]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/neurotrace demo --out demo_out --overwrite

test: setup
	$(BIN)/pytest -q

bench: setup
	$(BIN)/python benchmarks/convert.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache .hypothesis
