# The two commands: `make run` (the main job) and `make test` (the test suite).
# Each creates .venv if missing and installs everything it needs; torch comes first, pinned, so that no
# dependency can pull a different (multi-GB CUDA) build.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: run test install install-bench bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	@$(BIN)/python -c "import torch; assert torch.__version__.startswith('$(subst torch==,,$(TORCH))'), torch.__version__"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/r1kit run

test: install
	$(BIN)/python -m pytest

# the peers the benchmarks run against (TRL for bench/grpo.py), with torch pinned in the same request
$(VENV)/.bench: $(STAMP)
	$(BIN)/pip install -q -e ".[dev,bench]" "$(TORCH)"
	@$(BIN)/python -c "import torch; assert torch.__version__.startswith('$(subst torch==,,$(TORCH))'), torch.__version__"
	touch $@

install-bench: $(VENV)/.bench

bench: install-bench
	$(BIN)/python bench/train.py

clean:
	rm -rf $(VENV) runs .pytest_cache
