# Fresh machine: `make demo` or `make test` creates .venv and installs everything first.
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
ARGS ?=

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# The CPU build of torch (a wheel on disk on our machines); never the multi-GB CUDA build.
	$(VENV)/bin/pip install -q --find-links /opt/wheels "torch==2.13.0"
	$(VENV)/bin/pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

.PHONY: install demo test
install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pi0 demo $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(ARGS)
