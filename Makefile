# The README's two commands: `make demo` and `make test`. Each creates .venv and installs
# (torch first: the pinned CPU wheel; a looser requirement would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-run
TORCH := torch==2.13.0
PYTEST := $(PY) -m pytest
# pip in the venv, for the paths that use it (the venv is created without it)
ENSURE_PIP := $(PY) -m pip --version >/dev/null 2>&1 || $(PY) -m ensurepip >/dev/null

# The installer is chosen here, not by the user: uv when it is on PATH or can be installed
# into the venv from the package index (the whole set-up in ~6 s here), else pip (~95 s).
# The venv is created without pip (uv does not need it; pip is added only where it is used).
# torch comes from the directory pip is configured to find wheels in (the CPU wheel on disk);
# without one, pip installs it, following the machine's own pip settings, because
# torch==2.13.0 from the index alone is the multi-GB CUDA build.
#
# Bytecode is written on first import, not at install: these machines set
# PYTHONDONTWRITEBYTECODE, so make's commands run without it (below). Without bytecode on
# disk every Ray worker would compile its imports from source (the suite ran 2.2x slower);
# compiling all of .venv at install (uv --compile-bytecode) took ~30 of the set-up's ~37 s,
# the modules the suite imports ~10 s on their first import.
unexport PYTHONDONTWRITEBYTECODE
.PHONY: setup demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --without-pip $(VENV)
	@uv=$$(command -v uv || { { $(PYTHON) -m pip --python $(PY) install -q uv \
	                            || { $(ENSURE_PIP) && $(PY) -m pip install -q uv; }; } >/dev/null 2>&1 \
	                          && test -x $(VENV)/bin/uv && echo $(VENV)/bin/uv; }); \
	wheels=$$($(PYTHON) -m pip config get global.find-links 2>/dev/null || echo "$$PIP_FIND_LINKS"); \
	set -e; \
	if [ -n "$$uv" ]; then \
	  echo "installing with $$uv"; \
	  if [ -n "$$wheels" ] && ls "$$wheels"/torch-2.13.0* >/dev/null 2>&1; then \
	    $$uv pip install -q --python $(PY) --find-links "$$wheels" $(TORCH); \
	  else \
	    $(ENSURE_PIP); \
	    $(PY) -m pip install -q $(TORCH); \
	  fi; \
	  $$uv pip install -q --python $(PY) -e ".[dev]"; \
	else \
	  echo "uv unavailable: installing with pip"; \
	  $(ENSURE_PIP); \
	  $(PY) -m pip install -q $(TORCH); \
	  $(PY) -m pip install -q -e ".[dev]"; \
	fi
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/otmel demo --out $(DEMO_DIR)

# The whole suite in one pytest run: one local Ray instance for every test that needs one,
# one trained tiny model, one export, one index (tests/conftest.py); tests that need a
# multi-node cluster start it themselves. tests/README.md: what it proves, and its time.
test: $(STAMP)
	$(PYTEST) -q tests --durations=25

# The unit-level tests only (no Ray, no training: the tests not marked slow), for the inner loop.
test-fast: $(STAMP)
	$(PYTEST) -q tests -m "not slow"

bench: $(STAMP)
	$(PY) bench/sinkhorn.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
