# Two entry points (README quick start): `make demo` and `make test`.
# Both create .venv, install the CPU torch wheel first when no torch is importable
# (so pip never pulls a multi-GB CUDA build), then the package in editable mode.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.unbackdoor-installed
TORCH_CPU ?= torch==2.13.0

FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_CPU)
	@$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/unbackdoor demo --out runs/demo

# Real Fashion-MNIST (Debian's dataset-fashion-mnist, offline from the package registry):
# installed where apt can do it; elsewhere a note says how, and the tests that read it skip.
data:
	@if [ ! -f $(FASHION_MNIST)/train-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Fashion-MNIST (apt-get install -y dataset-fashion-mnist)"; \
	    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } || \
	      echo "note: could not install dataset-fashion-mnist; Fashion-MNIST tests will skip"; \
	  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
	    sudo -n apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	      echo "note: could not install dataset-fashion-mnist; Fashion-MNIST tests will skip"; \
	  else \
	    echo "note: Fashion-MNIST is not in $(FASHION_MNIST): run 'apt-get install -y dataset-fashion-mnist' as root," \
	         "or put the four IDX files in a folder and pass it as --root; its tests will skip"; \
	  fi; \
	fi

test: $(STAMP) data
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
