# roadwork: `make demo` and `make test` are the whole set-up on a fresh machine (Python 3.11 + pip).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
LOCK := requirements.lock
export ROADWORK_STATE ?= $(CURDIR)/state
export ROADWORK_INBOX ?= $(CURDIR)/data/inbox
# Absolute paths (`make demo ROADWORK_STATE=st` works: Dagster refuses a relative DAGSTER_HOME), spaces kept.
override ROADWORK_STATE := $(shell realpath -m -- "$(ROADWORK_STATE)")
override ROADWORK_INBOX := $(shell realpath -m -- "$(ROADWORK_INBOX)")
DEFAULT_DAGSTER_HOME := $(ROADWORK_STATE)/dagster_home
export DAGSTER_HOME ?= $(DEFAULT_DAGSTER_HOME)
override DAGSTER_HOME := $(shell realpath -m -- "$(DAGSTER_HOME)")
export MLFLOW_TRACKING_URI ?= sqlite:///$(ROADWORK_STATE)/mlflow.db
# Offline by construction: nothing here may reach a model hub.
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
DEMO_VERSION ?= v0001
DEMO_N ?= 2000
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` (auto: one per core); the slow tests are scheduled first.
PYTEST_WORKERS ?= auto

.PHONY: venv lock check-env bytecode postgres-deps home demo test ui lint bench clean-state browser screenshots profile-demo profile-epoch

# Install exactly the lock (every transitive dependency pinned), then the project itself without
# resolving anything (--no-deps, and no isolated build env that would fetch the newest setuptools).
$(STAMP): pyproject.toml $(LOCK)
	@# a venv whose interpreter is gone, or that was moved (its scripts name the old path), is made anew;
	@# one without pip (an interrupted `python -m venv`) gets pip back
	if [ ! -x $(PY) ] || ! $(PY) tools/lockfile.py scripts >/dev/null 2>&1; then rm -rf $(VENV); $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip --version >/dev/null 2>&1 || $(PY) -m ensurepip --upgrade
	$(PY) -m pip install --disable-pip-version-check "$$(grep -E '^pip==' $(LOCK))"
	$(PY) -m pip install -r $(LOCK)
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	$(PY) tools/lockfile.py check $(LOCK)
	$(PY) -m roadwork_resources.mlflow_store  # an empty migrated MLflow store, copied into fresh states
	touch $(STAMP)

# Re-sync .venv with the lock (also after a failed `make check-env`).
venv:
	rm -f $(STAMP)
	$(MAKE) $(STAMP)

# Deliberate upgrade: resolve pyproject.toml (+dev) afresh in a throw-away venv and pin the result.
# Review the diff of requirements.lock and commit it; see README "Dependencies".
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --upgrade pip setuptools wheel
	.lock-venv/bin/python -m pip install '.[dev]'
	.lock-venv/bin/python -m pip uninstall -y roadwork
	.lock-venv/bin/python tools/lockfile.py write $(LOCK)
	rm -rf .lock-venv

check-env: $(STAMP)
	$(PY) tools/lockfile.py check $(LOCK)

# The instance file: copied into a new DAGSTER_HOME; in the default one (state/dagster_home) refreshed when the
# repository's is newer; in a DAGSTER_HOME of your own (a Postgres instance, say) never overwritten.
home:
	@mkdir -p "$(DAGSTER_HOME)" "$(ROADWORK_INBOX)"
	@target="$(DAGSTER_HOME)/dagster.yaml"; \
	if [ ! -e "$$target" ]; then cp dagster.yaml "$$target"; \
	elif cmp -s dagster.yaml "$$target"; then :; \
	elif [ "$(DAGSTER_HOME)" = "$(DEFAULT_DAGSTER_HOME)" ]; then \
	  if [ dagster.yaml -nt "$$target" ]; then cp dagster.yaml "$$target"; echo "updated $$target from dagster.yaml"; fi; \
	else echo "note: $$target differs from the repository's dagster.yaml and is yours (DAGSTER_HOME); left as it is" >&2; fi

# Bytecode for the project's own modules. pip compiles what it installs into .venv, but not this source
# tree (an editable install), and where PYTHONDONTWRITEBYTECODE is set (this machine's image, many
# containers) nothing is ever cached: every process (a `dagster` call, code server, run worker, torchrun
# rank) would compile roadwork_* again. Only changed files are recompiled; __pycache__/ is git-ignored.
BYTECODE_DIRS := roadwork_assets roadwork_core roadwork_resources roadwork_commands bench tools tests
bytecode: $(STAMP)
	$(PY) -m compileall -q -j 0 $(BYTECODE_DIRS) >/dev/null

demo: $(STAMP) home bytecode
	$(PY) -m roadwork_commands.demo --inbox "$(ROADWORK_INBOX)" --version $(DEMO_VERSION) --n $(DEMO_N) --config configs/demo.yaml

# Where the demo's time goes: py-spy samples the demo and every process it starts (the dagster run, the
# DataLoader worker) into a flame graph, $(ROADWORK_STATE)/profile/demo.svg. `profile-epoch`: one classifier
# epoch of configs/demo.yaml (bench/bench_demo_epoch.py) the same way.
PROFILE_DIR := $(ROADWORK_STATE)/profile
profile-demo: $(STAMP) home bytecode
	mkdir -p "$(PROFILE_DIR)"
	$(VENV)/bin/py-spy record --subprocesses --rate 50 -o "$(PROFILE_DIR)/demo.svg" -- \
	  $(PY) -m roadwork_commands.demo --inbox "$(ROADWORK_INBOX)" --version $(DEMO_VERSION) --n $(DEMO_N) --config configs/demo.yaml

profile-epoch: $(STAMP)
	mkdir -p "$(PROFILE_DIR)"
	$(VENV)/bin/py-spy record --subprocesses --rate 50 -o "$(PROFILE_DIR)/epoch.svg" -- \
	  $(PY) -m bench.bench_demo_epoch --profile threads=1,workers=1

# The browser test (tests/e2e/test_browser.py) drives Debian's Chromium through Playwright.
CHROMIUM ?= /usr/bin/chromium
browser:
	@if [ -x "$(CHROMIUM)" ]; then echo "chromium: $(CHROMIUM)"; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; fi

# Re-take the README's two UI screenshots (docs/ui_*.png) with the browser test's helper.
screenshots: check-env browser
	ROADWORK_SCREENSHOT_DIR=$(CURDIR)/docs $(PY) -m pytest -q -p no:cacheprovider tests/e2e/test_browser.py
# PostgreSQL server binaries for the Postgres instance tests (tests/integration/test_postgres_instance.py
# starts its own server from them). Debian/Ubuntu package `postgresql`; a no-op where they are present.
postgres-deps:
	@if $(PYTHON) tools/pg_local.py bindir >/dev/null 2>&1; then \
	  echo "PostgreSQL server binaries: $$($(PYTHON) tools/pg_local.py bindir)"; \
	else \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends postgresql \
	  && $(PYTHON) tools/pg_local.py bindir; \
	fi

test: check-env bytecode
	$(PY) -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

ui: $(STAMP) home bytecode
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP) home bytecode
	$(PY) -m bench.run_all

clean-state:
	rm -rf -- "$(ROADWORK_STATE)" data
