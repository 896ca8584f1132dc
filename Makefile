# Fresh-machine entry points. `make train` and `make test` install what is missing first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
GPU_WHEELS ?= .gpu-wheels

.PHONY: install train test test-fast demo bench gpu-wheels clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the CPU wheel. Anything installed later that needs torch reuses it.
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,sweeps,demo]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(PY) -m conftrl.train experiment=canny_coft $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

# The web page of a trained adapter (the newest under outputs/ unless ARGS="adapter=<folder>").
demo: $(STAMP)
	$(PY) -m conftrl.demo $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/oft_layers.py

# What benchmarks/gpu.sh installs on a GPU machine without network that has torch, lightning,
# transformers, peft, opencv and safetensors: diffusers and Hydra, and what they import that those
# do not bring (Pillow, requests and its own dependencies; antlr4 for OmegaConf). For CPython 3.12
# on x86-64 Linux; manylinux_2_28 also admits the older manylinux tags, and Pillow ships no others.
gpu-wheels:
	# diffusers and Hydra for the benchmarks; torchdata and pydantic too for gpu.sh's training run.
	$(PYTHON) -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --no-deps -d $(GPU_WHEELS) \
		diffusers pillow requests urllib3 certifi charset-normalizer hydra-core "omegaconf>=2.2,<2.4" \
		torchdata pydantic pydantic-core annotated-types typing-inspection
	# antlr4-python3-runtime 4.9 (OmegaConf pins 4.9.*) is published as source only: build its pure-Python wheel.
	$(PYTHON) -m pip wheel -q --no-deps -w $(GPU_WHEELS) "antlr4-python3-runtime==4.9.3"
	du -sh $(GPU_WHEELS)

clean:
	rm -rf $(VENV) outputs multirun wandb .pytest_cache
