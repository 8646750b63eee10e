# xfrmtrace build, test and demo.  `make test` and `make demo` work on a fresh
# Debian 12 machine: `deps` installs the system packages everything else needs.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CLANG ?= clang
LLVM_STRIP ?= llvm-strip
BPF_OBJ := src/xfrmtrace/bpf/xfrm.bpf.o
# Kernel series for `make test-kernels` and `make demo` (tests/vmlab/kernels.py MATRIX):
# "all" is the whole matrix; e.g. KERNEL=6.12 or KERNEL=5.10,sid for a subset.
KERNEL ?= all
DEMO_KERNEL ?= 6.1
PYTEST_ARGS ?=

# Debian packages: build (clang, llvm, libbpf), run (libbpf1), VM lab (qemu,
# kmod, busybox, apt tooling), IPsec lab inside the guest (iproute2, iptables, ping),
# headless Chromium for the HTML report test.
DEB_PACKAGES := clang llvm libbpf-dev libbpf1 python3-venv python3-dev \
	qemu-system-x86 kmod busybox-static xz-utils iproute2 iptables iputils-ping \
	ca-certificates binutils bpftool tshark file debian-archive-keyring \
	chromium-headless-shell

.PHONY: all deps bpf venv test test-unit test-kernels test-vm demo sites lint clean
all: venv bpf

deps: .deps.stamp
.deps.stamp: Makefile
	@missing=$$(for p in $(DEB_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		if [ "$$(id -u)" != 0 ]; then echo "make deps: run as root to install:" $$missing >&2; exit 1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@touch $@

venv: $(VENV)/.stamp
$(VENV)/.stamp: setup.cfg pyproject.toml | deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,metrics]'
	@touch $@

bpf: $(BPF_OBJ)
$(BPF_OBJ): bpf/xfrm.bpf.c bpf/xfrm.h vmlinux.h | deps
	@mkdir -p $(dir $@)
	$(CLANG) -g -O2 -Wall -Werror -target bpf -D__TARGET_ARCH_x86 -I. -Ibpf -c $< -o $@
	$(LLVM_STRIP) -g $@

# Everything: unit tests, then the end-to-end suite on every kernel of the matrix.
test: all
	XFRMTRACE_KERNELS=all $(PY) -m pytest -ra $(PYTEST_ARGS) tests

test-unit: all
	$(PY) -m pytest -ra -m 'not vm' $(PYTEST_ARGS) tests

# The end-to-end suite (one VM boot per kernel): make test-kernels [KERNEL=6.12]
test-kernels: all
	XFRMTRACE_KERNELS=$(KERNEL) $(PY) -m pytest -ra -m vm $(PYTEST_ARGS) tests

test-vm: test-kernels

demo: all
	$(PY) -m tests.vmlab.demo --kernel $(DEMO_KERNEL)

sites: all
	sudo $(VENV)/bin/xfrmtrace sites

lint: all
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/mypy src

clean:
	rm -rf $(VENV) $(BPF_OBJ) .deps.stamp build dist *.egg-info src/*.egg-info
