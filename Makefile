# Everyday commands. Caches (pip, Go modules, built control-plane binaries) live outside the repo.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# Where `make install-cli` links the meshtls commands (and the cached helm) so they are on PATH.
BINDIR ?= /usr/local/bin
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv install-cli test test-unit lint test-e2e cluster-up cluster-down cluster-build demo bench bench-pki clean \
        image image-push

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	@touch $@
	@$(MAKE) --no-print-directory install-cli

# Puts meshtls, meshtls-proxy and kubectl-meshtls (a kubectl plugin) on PATH, when BINDIR is writable.
install-cli:
	@if [ -w "$(BINDIR)" ]; then \
	  for c in meshtls meshtls-proxy kubectl-meshtls; do ln -sf "$(abspath $(BIN))/$$c" "$(BINDIR)/$$c"; done; \
	  echo "linked meshtls, meshtls-proxy, kubectl-meshtls into $(BINDIR)"; \
	else echo "$(BINDIR) is not writable: use $(BIN)/meshtls or run 'make install-cli BINDIR=...'"; fi

test: lint test-unit test-e2e

test-unit: venv
	$(PY) -m pytest -q tests

lint: venv
	$(BIN)/ruff check operator tests e2e bench testsupport
	$(BIN)/mypy
	cd operator && ../$(BIN)/lint-imports ../.importlinter

# The e2e kubelet runs the injected sidecars from the image (MESHTLS_SIDECAR_FROM=venv: from the venv instead).
test-e2e: venv cluster-build $(if $(filter venv,$(MESHTLS_SIDECAR_FROM)),,image)
	$(PY) -m pytest -q -p no:cacheprovider e2e

# The image from the Dockerfile with buildah (no Docker needed), on a Debian trixie base made with debootstrap;
# cached in ~/.cache/meshtls/image by a hash of its inputs. With Docker: `docker build -t meshtls:0.1.0 .`
image: venv
	$(PY) -m testsupport.image build

# `make image-push REGISTRY=host:port` pushes it as REGISTRY/meshtls:<version> (loopback: no TLS verification).
image-push: venv
	$(PY) -m testsupport.image push "$(REGISTRY)"

cluster-build: venv
	$(PY) -m e2e.harness build

cluster-up: venv
	$(PY) -m e2e.harness up

cluster-down: venv
	$(PY) -m e2e.harness down

# `make demo KUBECONFIG=...` runs on that cluster instead of the embedded one.
demo: venv cluster-build
	$(if $(filter command line,$(origin KUBECONFIG)),MESHTLS_USE_EXISTING_CLUSTER=1 KUBECONFIG=$(KUBECONFIG),) $(PY) -m e2e.demo

bench-pki: venv
	$(PY) -m bench.pki

bench: venv cluster-build
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
