# Fresh-machine entry points. `make train` and `make test` install what is missing first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install train test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the CPU wheel. Anything installed later that needs torch reuses it.
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,sweeps]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(PY) -m conftrl.train experiment=canny_coft $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/oft_layers.py

clean:
	rm -rf $(VENV) outputs multirun wandb .pytest_cache
