# etcd_rdzv: `make demo` runs the main job, `make test` sets up and passes the checks.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch's CPU build; a bare `torch` resolves to a multi-GB CUDA build. Override both to
# taste, e.g. TORCH_SPEC='torch==2.13.0+cpu' PIP_TORCH_ARGS='--index-url <your CPU index>'.
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
STAMP := $(VENV)/.installed-stamp

.PHONY: install test pytest lint docs demo bench bench-quick clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[torch,server,dev]"
	touch $(STAMP)

install: $(STAMP)

test: lint docs pytest

pytest: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

docs: install
	$(BIN)/mkdocs build --strict -d build/site

demo: install
	$(BIN)/python examples/torchrun_demo.py

bench: install
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python -m benchmarks

bench-quick: install
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python -m benchmarks --quick

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
