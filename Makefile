# `make test` and `make demo` set up .venv themselves on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.forkwatch-installed
# The tested torch. On a machine with no torch yet this avoids pulling the newest CUDA build by default.
TORCH  ?= torch==2.13.0

.PHONY: test demo lint setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/forkwatch demo

clean:
	rm -rf $(VENV) demo_runs .pytest_cache .ruff_cache
