# Two entry points, both idempotent: `make demo` and `make test`.
# They create .venv in the repository and install dspark into it (editable).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# The CPU install path pins torch to the local CPU wheel; a GPU user passes TORCH_CONSTRAINTS=
TORCH_CONSTRAINTS ?= constraints/cpu.txt
PIP_FLAGS := $(if $(TORCH_CONSTRAINTS),-c $(TORCH_CONSTRAINTS),)
STAMP := $(VENV)/.dspark-installed
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test clean-venv

$(STAMP): pyproject.toml $(TORCH_CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip setuptools wheel
	$(if $(TORCH_CONSTRAINTS),$(PY) -m pip install -q $(PIP_FLAGS) "$$(grep -m1 '^torch' $(TORCH_CONSTRAINTS))",)
	$(PY) -m pip install -q $(PIP_FLAGS) -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# The platform on one machine: builds (or reuses) the demo target and its DSpark drafter, serves
# them with Ray Serve beside plain decoding, sweeps concurrency with the openai client, prints a summary.
demo: setup
	$(VENV)/bin/dspark demo

# The test command CI runs.
test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
