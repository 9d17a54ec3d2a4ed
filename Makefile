# KVC developer tasks. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

##@ General

.PHONY: help
help: ## Show this help.
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make \033[36m<target>\033[0m\n"} \
		/^[a-zA-Z0-9_-]+:.*?##/ { printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2 } \
		/^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

.PHONY: venv
venv: $(VENV)/.installed ## Create .venv with KVC and its development dependencies.

##@ Control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok)

.PHONY: testenv
testenv: $(VENV)/.installed ## Build the local control plane once; cached outside the repository.
	$(PY) -m e2e.testenv.build build

.PHONY: testenv-update
testenv-update: $(VENV)/.installed ## Regenerate e2e/testenv/gomod/* after changing e2e/testenv/versions.toml.
	$(PY) -m e2e.testenv.build update

##@ Demo

.PHONY: demo
demo: testenv ## All of KVC on one machine: 4 nodes, S3 and HTTP data, webhook, a Pod and a TFJob (`make demo-down` stops it).
	$(PY) -m e2e.demo up

.PHONY: demo-status
demo-status: $(VENV)/.installed ## The demo's processes: status, restarts, last exit (KVC's are restarted with back-off).
	$(PY) -m e2e.demo status

.PHONY: demo-down
demo-down: $(VENV)/.installed ## Stop every process of the demo and remove its files.
	$(PY) -m e2e.demo down

##@ Test

.PHONY: test
test: testenv ## Run every test: unit and e2e against the real control plane.
	$(PY) -m pytest tests e2e $(PYTEST_ARGS)

.PHONY: test-unit
test-unit: $(VENV)/.installed ## Run the fast unit tests only.
	$(PY) -m pytest tests $(PYTEST_ARGS)

.PHONY: test-e2e
test-e2e: testenv ## Run the e2e tests against the real control plane.
	$(PY) -m pytest e2e $(PYTEST_ARGS)

.PHONY: test-faults
test-faults: testenv ## Fault suite: seeded kills and restarts of every component, then invariants (KVC_FAULT_SEED=n replays).
	$(PY) -m pytest e2e/faults $(PYTEST_ARGS)

.PHONY: lint
lint: $(VENV)/.installed ## ruff (lint + format check) and mypy --strict.
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

.PHONY: fmt
fmt: $(VENV)/.installed ## Format the code and apply safe lint fixes.
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

##@ Deploy (needs Docker; kind-e2e also needs kind)

IMG ?= kvc:dev
KIND_CLUSTER ?= kvc-e2e

.PHONY: docker-build
docker-build: ## Build the one image of every component (IMG=kvc:dev).
	docker build -t $(IMG) .

.PHONY: kind-e2e
kind-e2e: docker-build $(VENV)/.installed ## Install deploy/default with IMG into a kind cluster and smoke-check it.
	IMG=$(IMG) KIND_CLUSTER=$(KIND_CLUSTER) KVC=$(VENV)/bin/kvc e2e/kind.sh

##@ Benchmarks

BENCH_VENV ?= .venv-bench

$(BENCH_VENV)/bin/aws:
	# awscli pins its own botocore: it gets a virtualenv of its own.
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet awscli

.PHONY: bench
bench: $(VENV)/.installed $(BENCH_VENV)/bin/aws testenv ## Benchmarks, printed as tables with ratios against baselines.
	$(PY) -m e2e.bench_webhook
	$(PY) -m e2e.bench_fetch --aws $(BENCH_VENV)/bin/aws
	$(PY) -m e2e.bench_controller
	$(PY) -m e2e.bench_listing_memory

##@ Cleanup

.PHONY: clean
clean: ## Remove the virtualenv, caches and kept e2e logs (not the cached control plane).
	rm -rf $(VENV) $(BENCH_VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis .e2e-logs *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

.PHONY: clean-testenv
clean-testenv: ## Remove the cached control-plane binaries (the next `make testenv` rebuilds them).
	rm -rf "$${KVC_TESTENV_DIR:-$${XDG_CACHE_HOME:-$$HOME/.cache}/kvc/testenv}"
