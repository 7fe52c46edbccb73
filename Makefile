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

# The TTNN backend's tests need ttnn, which has wheels for Python 3.10 and 3.12 only: a second venv of Python 3.12
# (PATH or pyenv), torch from PyPI (the CPU wheel on disk is for 3.11 only).
TTNN_PY ?= $(shell for p in python3.12 $$(ls -d $$HOME/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null); do \
	$$p -V >/dev/null 2>&1 && { echo $$p; break; }; done)
TTNN_VENV := .venv-ttnn
TTNN_STAMP := $(TTNN_VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

$(TTNN_STAMP): pyproject.toml
	$(TTNN_PY) -m venv $(TTNN_VENV)
	$(TTNN_VENV)/bin/pip install -q --upgrade pip
	$(TTNN_VENV)/bin/pip install -q -e '.[ttnn]' "pytest>=8" "pytest-timeout>=2.2"
	rm -f $(TTNN_VENV)/.installed-* && touch $@

.PHONY: install demo test ttnn-venv test-ttnn
ttnn-venv: $(TTNN_STAMP)
install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pi0 demo $(ARGS)

# The suite in parallel (a worker per core, at most 4), then the timed tests alone; pytest's exit code 5 means
# ARGS selected none of them.
JOBS ?= $(shell n=$$(nproc); [ $$n -gt 4 ] && n=4; echo $$n)
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n $(JOBS) --dist loadgroup -m "not serial" $(ARGS) || [ $$? = 5 ]
	$(VENV)/bin/python -m pytest -q -m serial $(ARGS) || [ $$? = 5 ]
	$(MAKE) --no-print-directory test-ttnn

test-ttnn:
ifeq ($(TTNN_PY),)
	@echo "TTNN tests SKIPPED: no Python 3.12 on this machine (PATH or pyenv), and ttnn ships wheels for 3.10 and 3.12 only"
else
	$(MAKE) --no-print-directory $(TTNN_STAMP)
	@echo "TTNN tests: $(TTNN_VENV) ($$($(TTNN_VENV)/bin/python -V), ttnn $$($(TTNN_VENV)/bin/pip show ttnn | sed -n 's/^Version: //p'))"
	$(TTNN_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/backends/test_ttnn.py tests/cli/test_ttnn_cli.py
endif
