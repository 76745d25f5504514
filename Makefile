# featurelake: the README's two commands are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench ui clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)  ## set up, then materialize every asset for the default profile
	$(BIN)/featurelake demo

test: $(STAMP)  ## set up, then run the whole test suite
	$(BIN)/ruff check dagster_project assets tests benchmarks
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check dagster_project assets tests benchmarks

bench: $(STAMP)  ## CPU benchmarks of every stage; results go to BENCHMARKS.md by hand
	$(BIN)/python benchmarks/extract.py
	$(BIN)/python benchmarks/stats.py

ui: $(STAMP)  ## the Dagster UI on 127.0.0.1:$(PORT)
	$(BIN)/featurelake ui --port $(or $(PORT),3000)

clean:
	rm -rf $(VENV) .dagster_home .cache
