# Two commands for a new user: `make demo` and `make test`.  Every target installs first.
# `make docs` builds the documentation site (docs/) into site/.
PY ?= python3
# STACK=released (default): hydra-optuna-sweeper 1.3, optuna 2, SQLAlchemy 1.4, in .venv.
# STACK=next: the pins of [tool.rld] next-stack in pyproject.toml (hydra 1.4rc, optuna 4.9+,
# SQLAlchemy 2) in .venv-next; every target below works with either (`make test-next`).
STACK ?= released
ifeq ($(STACK),next)
VENV := .venv-next
else ifeq ($(STACK),released)
VENV := .venv
else
$(error STACK=$(STACK): use released or next)
endif
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-slow demo table lint docs slurm-test db-test test-next bench \
	dashboard teachers clean-venv

install: $(STAMP)

# Re-installs only when pyproject.toml changes: a second `make install` costs nothing.  The
# next stack: pyproject's requirements with the next-stack pins in place of their packages
# (scripts/next/requirements.py), then this project without dependencies.
$(STAMP): pyproject.toml $(if $(filter next,$(STACK)),scripts/next/requirements.py)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
ifeq ($(STACK),next)
	$(PY) scripts/next/requirements.py > $(VENV)/requirements.txt
	$(BIN)/python -m pip install -q -r $(VENV)/requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
else
	$(BIN)/python -m pip install -q -e ".[dev]"
endif
	touch $(STAMP)

# the suite, ~9 min on 2 cores (8 min 35 s on a fresh clone, 2026-12-06); the longest
# end-to-end runs (kill and resume, data-parallel, launchers, Optuna) are marked slow:
# `make test-slow` (CI runs both, then slurm-test and db-test)
test: install
	$(BIN)/python -m pytest -q -m "not slurm and not slow and not db"

test-slow: install
	$(BIN)/python -m pytest -q -m "slow and not slurm and not db"

demo: install
	bash scripts/demo.sh

table: install
	$(BIN)/python -m rld.table

lint: install
	$(BIN)/ruff check .

# the documentation site (docs/, mkdocs.yml) into site/, strict: a broken link, a missing
# page or a docstring the API pages cannot render fails the build.  The docs extra's packages
# install once per pyproject.toml change, alone (the stack's own pins stay as they are); the
# configuration reference is generated during the build (scripts/docs/hooks.py).
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['docs']))" > $(VENV)/docs-requirements.txt
	$(BIN)/python -m pip install -q -r $(VENV)/docs-requirements.txt
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

slurm-test: install
	bash scripts/slurm/test.sh

# studies shared by several sweepers on a real PostgreSQL server (started on 127.0.0.1 from
# Debian's packages, stopped by process id; installed when missing) and on sqlite, under
# faults: scripts/db/test.sh
db-test: install
	PYTHON=$(BIN)/python bash scripts/db/test.sh

# the next release stack in .venv-next: the sweeper, storage, compatibility and dashboard
# tests (slow ones too), then the database suite
NEXT_TESTS := tests/test_optuna.py tests/test_optuna_compat.py tests/test_storage.py \
	tests/test_dashboard.py
test-next:
	$(MAKE) STACK=next install
	.venv-next/bin/python -m pytest -q -m "not slurm and not db" $(NEXT_TESTS)
	$(MAKE) STACK=next db-test

# every benchmark at its default size, except the grid: 4 points (16, both packed modes:
# 5 min 46 s on a 2-core CPU)
bench: install
	$(BIN)/python -m rld.bench step
	$(BIN)/python -m rld.bench data
	$(BIN)/python -m rld.bench data --dataset imagenet
	$(BIN)/python -m rld.bench grid --points 4
	$(BIN)/python -m rld.bench epoch

# teachers: make teachers [ARGS="fetch --dataset cifar100"] (default: list; any command and
# override of `python -m rld.teachers`: list | fetch | verify | train, e.g. ARGS="verify pair=vgg13_vgg8")
ARGS ?= list
teachers: install
	$(BIN)/python -m rld.teachers $(ARGS)

# Optuna dashboard of a study: make dashboard [TAG=main] [PORT=8080] [HOST=127.0.0.1]
# [DB=sweeps/$(TAG)/optuna.db] (the study of a sweep given another hydra.sweep.dir: DB=<dir>/optuna.db)
# or STORAGE=postgresql://user@host:port/db (the password from PGPASSWORD or ~/.pgpass);
# STACK=next serves it with the next stack's optuna-dashboard
TAG ?= main
PORT ?= 8080
HOST ?= 127.0.0.1
DB ?= sweeps/$(TAG)/optuna.db
STORAGE ?=
dashboard: install
ifeq ($(STORAGE),)
	@test -f "$(DB)" || { echo "no study at $(DB): run an hparams=grid|tpe sweep with tag=$(TAG) first (or give DB=... or STORAGE=...)" >&2; exit 2; }
	$(BIN)/optuna-dashboard "sqlite:///$(abspath $(DB))" --host $(HOST) --port $(PORT)
else
	@$(BIN)/python -m rld.storage "$(STORAGE)"
	$(BIN)/optuna-dashboard "$(STORAGE)" --host $(HOST) --port $(PORT)
endif

clean-venv:
	rm -rf .venv .venv-next
