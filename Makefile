# Two commands for a new user: `make demo` and `make test`.  Every target installs first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-slow demo table lint slurm-test bench dashboard teachers clean-venv

install: $(STAMP)

# Re-installs only when pyproject.toml changes: a second `make install` costs nothing.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# the suite, ~5 min on 2 cores; the longest end-to-end runs (kill and resume, data-parallel,
# launchers, Optuna) are marked slow: `make test-slow` (CI runs both, then slurm-test)
test: install
	$(BIN)/python -m pytest -q -m "not slurm and not slow"

test-slow: install
	$(BIN)/python -m pytest -q -m "slow and not slurm"

demo: install
	bash scripts/demo.sh

table: install
	$(BIN)/python -m rld.table

lint: install
	$(BIN)/ruff check .

slurm-test: install
	bash scripts/slurm/test.sh

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
TAG ?= main
PORT ?= 8080
HOST ?= 127.0.0.1
DB ?= sweeps/$(TAG)/optuna.db
dashboard: install
	@test -f "$(DB)" || { echo "no study at $(DB): run an hparams=grid|tpe sweep with tag=$(TAG) first (or give DB=...)" >&2; exit 2; }
	$(BIN)/optuna-dashboard "sqlite:///$(abspath $(DB))" --host $(HOST) --port $(PORT)

clean-venv:
	rm -rf $(VENV)
