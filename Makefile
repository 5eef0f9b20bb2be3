# Underpass: the two set-up commands are `make demo` and `make test` (as root on
# a fresh Debian machine). Everything they need is installed from here.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# System packages the tests and the demo use as real peers and parts.
APT_PACKAGES := openssl curl ca-certificates iproute2 nftables containernetworking-plugins

.PHONY: demo test lint typecheck unit system-deps venv proto bench clean

demo: system-deps $(STAMP)
	$(BIN)/underpass demo

test: system-deps $(STAMP) lint typecheck k8s-binaries
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -m unit

venv: $(STAMP)

system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if ! $(PYTHON) -c 'import venv, ensurepip' 2>/dev/null; then missing="$$missing python3-venv"; fi; \
	if [ -n "$$missing" ]; then \
	    echo "==> installing system packages:" $$missing; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	        apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "==> system packages present"; fi

$(STAMP): pyproject.toml
	@echo "==> creating $(VENV) and installing underpass[test]"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(MAKE) --no-print-directory bytecode
	touch $@

# Bytecode caches, written once: machines that set PYTHONDONTWRITEBYTECODE would
# otherwise compile every module in every process they start. Plain for every
# process, and -OO (docstrings dropped) for the proxies, which run with
# PYTHONOPTIMIZE=2 (see underpass/lab/mesh.py PROXY_ENV). The standard library
# is compiled where it is writable (pyenv and python.org builds ship it already).
PY_PACKAGES := underpass ztunnel identity cni discovery waypoint
.PHONY: bytecode
bytecode:
	@echo "==> compiling bytecode (plain and -OO) for the venv and $(PY_PACKAGES)"
	@site=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	stdlib=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])'); \
	$(BIN)/python -m compileall -q -j0 $(PY_PACKAGES) >/dev/null && \
	$(BIN)/python -OO -m compileall -q -j0 $(PY_PACKAGES) "$$site" >/dev/null && \
	{ $(BIN)/python -OO -m compileall -q -j0 -x '/(test|tests|idlelib|lib2to3)/' "$$stdlib" \
	    >/dev/null 2>&1 || true; }

# k8s test tier: kube-apiserver and etcd built with Go from the Go module proxy,
# cached in ~/.cache/underpass/k8s/<version>/ (cold: 6-12 min on 2 cores; then instant).
# Rebuild: $(BIN)/python -m tests.support.kubeapi build --rebuild
.PHONY: k8s-binaries
k8s-binaries: $(STAMP)
	$(BIN)/python -m tests.support.kubeapi build

# Regenerate the committed protobuf/gRPC modules from the .proto files
# (tests/underpass/test_generated_protos.py fails when they drift).
proto: $(STAMP)
	$(BIN)/python -m underpass.protogen

bench: $(STAMP)
	$(BIN)/python -m bench.ca_issuance
	$(BIN)/python -m bench.hbone_relay
	$(BIN)/python -m bench.discovery_push
	$(BIN)/python -m bench.ztunnel_memory
	$(BIN)/python -m bench.ztunnel_lab

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
