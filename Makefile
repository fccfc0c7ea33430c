PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: run test lint fuzz bench bench-continue profile clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-run: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	$(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

fuzz: $(VENV)/.installed-dev
	$(BIN)/python -m tests.fuzz_server --examples 300

bench: $(VENV)/.installed-dev
	$(BIN)/python -m bench.hot_path $(BENCH_ARGS)

bench-continue: $(VENV)/.installed-dev
	$(BIN)/python -m bench.continue_throughput

# py-spy on one worker under wrk's create+continue loop; top functions by self and total time
profile: $(VENV)/.installed-dev
	$(BIN)/pip install --quiet py-spy
	$(BIN)/python -m bench.profile $(PROFILE_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache .hypothesis
