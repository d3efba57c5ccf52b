# Baton developer targets. `make help` lists them.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DELETE_ON_ERROR:

PYTHON ?= python3
VENV ?= .venv
BATON := $(VENV)/bin/baton
PYTEST_ARGS ?=

.PHONY: help
help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -c constraints.txt --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

.PHONY: install
install: $(VENV)/.installed ## create .venv with Baton and its test dependencies

.PHONY: binaries
binaries: ## build the local control plane's binaries once per machine (cached under ~/.cache/baton-testbed)
	bash operator/baton/devcluster/build-binaries.sh

.PHONY: redis-server
redis-server: ## install redis-server (Debian's package) for the redis hold-store tests, once per machine
	@command -v redis-server >/dev/null || { \
	  command -v apt-get >/dev/null || { echo "error: the tests need redis-server; install it" >&2; exit 1; }; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  echo "installing redis-server (Debian package) for the redis hold-store tests"; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server >/dev/null \
	    || { $$SUDO apt-get update -q >/dev/null \
	         && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server >/dev/null; }; \
	}

.PHONY: triton-venv
triton-venv: ## the PyTriton venv the Triton tests run the simulator in, once per machine (~/.cache/baton-triton-venv)
	bash operator/baton/engine_sim/triton-venv.sh $(CURDIR) >/dev/null

.PHONY: test
test: install binaries redis-server triton-venv ## run every test (brings the local cluster and a redis-server up itself)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

.PHONY: demo
demo: install binaries ## run Baton's main job on a local cluster it brings up itself
	$(BATON) demo

.PHONY: bench-operator
bench-operator: install binaries ## operator benchmark (N = 1, 100, 500 models; memory at 1,000) -> BENCHMARKS.md
	$(BATON) bench operator

.PHONY: bench-scheduler
bench-scheduler: install ## scheduler overhead benchmark -> BENCHMARKS.md
	$(BATON) bench scheduler

.PHONY: crds
crds: install ## regenerate crds/, the chart's copy and docs/api-reference.md from the API models
	$(BATON) crd --output-dir crds
	cp crds/disaggregatedmodels.serving.baton.dev.yaml charts/baton/crds/
	$(BATON) api-reference --output docs/api-reference.md

.PHONY: up
up: install ## bring the local cluster up (builds binaries on first use)
	$(BATON) devcluster up

.PHONY: down
down: install ## stop the local cluster and remove its state
	$(BATON) devcluster down
