# attnpipe: set-up and checks. `make test` does the whole set-up on a fresh machine, then runs the suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.attnpipe-installed
# The CPU build of torch, used where no CUDA GPU is present (a plain `torch` requirement
# would pull a CUDA build of several GB). On a GPU machine the CUDA build is left alone.
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=

# Debian's Chromium and its driver for the browser test of the MLflow UI (tests/browser.py)
BROWSER_PKGS := chromium chromium-driver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup browser test test-fast demo lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then \
	  $(PIP) install -q "$(TORCH_CPU)"; fi
	# DeepSpeed builds from source and imports torch while it does: build it against the
	# torch just installed instead of an isolated environment that would fetch another.
	$(PIP) install -q --no-build-isolation "$$(grep -o '"deepspeed==[^"]*"' pyproject.toml | tr -d '"')"
	$(PIP) install -q -e '.[dev]'
	# DeepSpeed's CPU communication op, compiled once here instead of at a job's start
	$(PY) -m pipeline.train.ops
	touch $@

browser:
	@if ! test -x /usr/bin/chromium || ! test -x /usr/bin/chromedriver; then \
	  echo "installing Debian's $(BROWSER_PKGS) for the MLflow UI browser test"; \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(BROWSER_PKGS); \
	fi

test: setup browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The fast tier for the inner loop: models, attention, config, planner and CLI checks, with no
# Ray cluster, MLflow server or multi-rank run. `make test` still runs everything.
FAST_TESTS := tests/test_attention_seam.py tests/test_config.py tests/test_flex_mask.py \
  tests/test_flops.py tests/test_mask_mod_compile.py tests/test_models.py tests/test_probe.py \
  tests/test_sizing.py tests/test_sparse_attention.py tests/test_plan.py tests/test_cli.py \
  tests/test_kinds.py

test-fast: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest $(FAST_TESTS) $(PYTEST_ARGS)

# The main job end to end on embedded defaults: local Ray, a local MLflow store in
# attnpipe-work/, the bundled demo corpus. `.venv/bin/attnpipe ui` then shows it.
demo: setup
	$(VENV)/bin/attnpipe run jobs/demo.yaml

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
