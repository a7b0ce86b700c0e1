# roadwork: `make demo` and `make test` are the whole set-up on a fresh machine (Python 3.11 + pip).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export ROADWORK_STATE ?= $(CURDIR)/state
export ROADWORK_INBOX ?= $(CURDIR)/data/inbox
export DAGSTER_HOME ?= $(ROADWORK_STATE)/dagster_home
export MLFLOW_TRACKING_URI ?= sqlite:///$(ROADWORK_STATE)/mlflow.db
# Offline by construction: nothing here may reach a model hub.
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
DEMO_VERSION ?= v0001
DEMO_N ?= 2000
PYTEST_ARGS ?=

.PHONY: venv demo test ui lint bench clean-state

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME) $(ROADWORK_INBOX)
	cp dagster.yaml $(DAGSTER_HOME)/dagster.yaml

home: $(DAGSTER_HOME)/dagster.yaml

demo: $(STAMP) home
	$(PY) -m roadwork_assets.demo --inbox $(ROADWORK_INBOX) --version $(DEMO_VERSION) --n $(DEMO_N) --config configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

ui: $(STAMP) home
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP) home
	$(PY) -m bench.run_all

clean-state:
	rm -rf $(ROADWORK_STATE) data
