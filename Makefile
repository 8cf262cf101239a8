# The README's two commands: `make demo` and `make test`. Each creates .venv and installs
# (torch first: the pinned CPU wheel; a looser requirement would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-run

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/otmel demo --out $(DEMO_DIR)

# three invocations: tests/cluster starts its own multi-node clusters, tests/reliability its own
# servers and fault proxies (neither shares the main suite's local Ray)
test: $(STAMP)
	$(PY) -m pytest -q tests --ignore=tests/cluster --ignore=tests/reliability
	$(PY) -m pytest -q tests/reliability
	$(PY) -m pytest -q tests/cluster

bench: $(STAMP)
	$(PY) bench/sinkhorn.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
