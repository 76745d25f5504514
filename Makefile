# featurelake: the README's two commands are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PORT ?= 3000

.PHONY: setup setup-test demo test lint bench ui clean

SHELL := /bin/bash
# pip prints one "Location ... is ignored" warning per package for every configured package folder that
# this machine lacks (hundreds of lines on a fresh install); only those lines are dropped, and pip's own
# exit status is kept (pipefail).
QUIET_PIP := 2>&1 | { grep -v "^WARNING: Location 'file://.*' is ignored: it is neither a file nor a directory." || true; }

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	set -o pipefail; $(BIN)/pip install --quiet --upgrade pip $(QUIET_PIP)
	set -o pipefail; $(BIN)/pip install --quiet -e '.[dev]' $(QUIET_PIP)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)  ## set up, then materialize every asset for the default profile
	$(BIN)/featurelake demo

# The browser test (tests/test_ui_browser.py) drives Debian's Chromium through Playwright's Python API;
# `playwright install` is not used (it downloads its own browsers).
setup-test: $(STAMP)  ## Chromium for the browser test, installed as on a fresh machine
	command -v chromium >/dev/null || ($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium)

test: setup-test  ## set up, then run the whole test suite (ruff, mypy, pytest)
	$(BIN)/ruff check dagster_project assets tests benchmarks
	$(BIN)/mypy dagster_project assets
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check dagster_project assets tests benchmarks
	$(BIN)/mypy dagster_project assets

bench: $(STAMP)  ## CPU benchmarks of every stage and one summary table (benchmarks/out/summary.md)
	$(BIN)/python benchmarks/run_all.py

ui: $(STAMP)  ## the Dagster UI (webserver + daemon) on 127.0.0.1:$(PORT); Ctrl-C stops it
	$(BIN)/featurelake ui --port $(PORT)

clean:
	rm -rf $(VENV) .dagster_home .cache
