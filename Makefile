# Two entry points for a fresh machine (see README.md):
#   make export [MODEL=path-or-hub-id] [OPS=contrib|portable]   install, then export (the demo model by default)
#   make test                                                    install, then lint and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?=
OPS ?= contrib

.PHONY: install export test

install: $(VENV)/.installed

# torch is pinned to the CPU wheel first: an unpinned resolve pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

export: install
	$(VENV)/bin/lfm-export $(MODEL) --ops $(OPS)

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q
