# Everything from a fresh clone: `make demo` (the main job on a bundled tiny model) and `make test`.
# Set-up is a local venv with the CPU build of torch (a bare `torch` requirement can pull a multi-GB CUDA build)
# and the other packages at the versions in constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# Where pip looks for torch. Empty: the configured indexes (PyPI's Linux torch is a CUDA build; this project's
# machines carry the CPU build locally). Elsewhere, for the CPU build:
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test]" -c constraints.txt
	touch $@

.PHONY: setup demo test test-all bench
setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/gemmaquant quantize tiny-moe --bits 4 --out out/tiny-moe-int4 --overwrite
	@echo "next: source $(VENV)/bin/activate, then gemmaquant --help (or call $(VENV)/bin/gemmaquant)"

test: setup
	$(PY) -m pytest -q

test-all: setup  # + slow and llama.cpp-backed tests (set LLAMA_CPP_DIR to a llama.cpp build)
	$(PY) -m pytest -q -m "slow or not slow"
