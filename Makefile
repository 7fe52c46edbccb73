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

# The suite in parallel (a worker per core, at most 4), then the timed tests alone; pytest's exit code 5 means
# ARGS selected none of them.
JOBS ?= $(shell n=$$(nproc); [ $$n -gt 4 ] && n=4; echo $$n)
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n $(JOBS) --dist loadgroup -m "not serial" $(ARGS) || [ $$? = 5 ]
	$(VENV)/bin/python -m pytest -q -m serial $(ARGS) || [ $$? = 5 ]
