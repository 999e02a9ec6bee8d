# epviz: `make figures` reproduces every figure, `make test` runs the tests.
# Both create .venv when missing, install epviz into it, and fetch the data; both are
# idempotent (a second run reuses the venv, the data and the token caches).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.epviz-installed
PYTEST_ARGS ?=

.PHONY: all install data browser lint results-check test test-fast figures zoo bench clean-cache help

all: figures

help:
	@echo "make figures   reproduce every figure into figures/ (and figures/report.html)"
	@echo "make test      lint, the README's results check, then the test suite (library tests and notebooks under nbval)"
	@echo "make test-fast the unit tests alone (no notebooks, no browser, nothing slow): well under a minute"
	@echo "make lint      ruff (lint and format check) and mypy"
	@echo "make bench     run the speed benchmarks in benchmarks/"
	@echo "make zoo       pre-train the zoo's pre-training axis (CPU hours; resumable)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST: found in $$EPVIZ_DATA, the user cache or /usr/share/datasets/fashion-mnist;
# where apt is available and the Debian package is missing, install it.
data: $(STAMP)
	@$(PY) -m epviz.data --check --no-download 2>/dev/null || { \
	  if command -v apt-get >/dev/null 2>&1 && { [ "$$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then \
	    SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	    echo "installing the Debian package dataset-fashion-mnist"; \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	  fi; \
	  $(PY) -m epviz.data --check; }

# The browser test drives JupyterLab in headless Chromium (Debian package chromium, found at
# /usr/bin/chromium); where apt is available and it is missing, install it. Without it the
# browser test is skipped, the rest of the suite runs.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && { [ "$$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then \
	    SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	    echo "installing the Debian package chromium"; \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null \
	      || echo "chromium could not be installed: the browser test will be skipped"; \
	  else echo "chromium is missing and apt is not available: the browser test will be skipped"; fi; }

lint: $(STAMP)
	$(VENV)/bin/ruff check epviz tests scripts benchmarks
	$(VENV)/bin/ruff format --check epviz tests scripts benchmarks
	$(VENV)/bin/mypy

# The README's results section must be what docs/results.csv (a full run's published table) gives.
results-check: $(STAMP)
	$(PY) -m epviz.cli results --check

test: lint results-check data browser
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow and not browser and not notebook" $(PYTEST_ARGS)

figures: data
	$(PY) -m epviz.cli reproduce

# the pre-training axis (CPU hours; every run resumes from its last finished epoch)
zoo: $(STAMP)
	$(PY) scripts/train_zoo.py mae --epochs 20 --save-at 2,7 --dtype fp16 --resume
	$(PY) scripts/train_zoo.py ssl --epochs 3 --batch-size 128 --dtype fp16 --resume
	$(PY) scripts/train_zoo.py mae --epochs 7 --seed 1 --dtype fp16 --resume
	$(PY) scripts/train_zoo.py ssl --epochs 2 --batch-size 128 --seed 1 --dtype fp16 --resume

bench: data
	$(PY) benchmarks/extract.py
	$(PY) benchmarks/probes.py
	$(PY) benchmarks/head_grid.py --threads 1
	$(PY) benchmarks/scale.py

clean-cache:
	rm -rf "$${EPVIZ_CACHE:-$$HOME/.cache/epviz/tokens}"
