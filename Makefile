# Two commands for a new user: `make demo` and `make test`.  Every target installs first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo table lint slurm-test bench clean-venv

install: $(STAMP)

# Re-installs only when pyproject.toml changes: a second `make install` costs nothing.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q -m "not slurm"

demo: install
	bash scripts/demo.sh

table: install
	$(BIN)/python -m rld.table

lint: install
	$(BIN)/ruff check .

slurm-test: install
	bash scripts/slurm/test.sh

bench: install
	$(BIN)/python -m rld.bench step
	$(BIN)/python -m rld.bench data
	$(BIN)/python -m rld.bench epoch

clean-venv:
	rm -rf $(VENV)
