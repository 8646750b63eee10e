# syntax=docker/dockerfile:1
# xfrmtrace container image.  Build it with `make image`, which passes SOURCE_DATE_EPOCH (the
# last commit's time, for reproducible file and image times) and VERSION.  Run it as the Helm
# chart in charts/xfrmtrace does (capabilities, host /proc at /host/proc, /sys/kernel/btf,
# /run/netns, hostNetwork): see README.md, "Single-file tool and container image".
#
# Base image: the tag follows Debian's point releases.  For a build that does not move, pin
# it by digest, e.g.
#   docker buildx imagetools inspect debian:bookworm-slim     (or: skopeo inspect docker://...)
#   make image IMAGE_BUILD_ARGS="--build-arg BASE_IMAGE=debian:bookworm-slim@sha256:<digest>"
# Both stages must use the same image: the venv made in the builder links to its python3.
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS builder
ARG SOURCE_DATE_EPOCH
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates clang llvm libbpf-dev make python3 python3-pip python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Makefile vmlinux.h setup.cfg pyproject.toml README.md dist-requirements.txt ./
COPY bpf/ bpf/
COPY src/ src/
# The BPF object, by the Makefile's own rule; its `deps` step (the host's Debian packages,
# qemu and all) is marked done: this stage installed what the rule needs above.
RUN touch .deps.stamp && make bpf
# The project's wheel (its build backend pinned by PIP_CONSTRAINT), the pinned dependencies
# as wheels, then an offline install into a venv without pip.  With SOURCE_DATE_EPOCH set
# the .pyc files pip compiles are hash-based, hence the same from build to build; the
# image is read-only at run time (PYTHONDONTWRITEBYTECODE), so they must be made here.
ENV PIP_CONSTRAINT=/src/dist-requirements.txt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python3 -m pip wheel -q --no-deps -w /wheels . \
    && wheel=$(echo /wheels/xfrmtrace-*.whl) \
    && python3 -m pip download -q --only-binary=:all: -d /wheels "$wheel[metrics]" \
    && python3 -m venv --without-pip /opt/xfrmtrace \
    && python3 -m pip --python /opt/xfrmtrace/bin/python install -q --no-index \
        --find-links /wheels "$wheel[metrics]" \
    && /opt/xfrmtrace/bin/xfrmtrace --version

FROM ${BASE_IMAGE}
ARG VERSION=unknown
ARG SOURCE_URL=
ARG DEBIAN_FRONTEND=noninteractive
LABEL org.opencontainers.image.title="xfrmtrace" \
      org.opencontainers.image.description="Trace every Linux XFRM (IPsec) error counter increment to the packet, SA and policy behind it" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="GPL-2.0-only"
# The runtime: Python and libbpf.so.1, nothing else.  The logs and caches apt leaves behind
# are removed too (they would differ from build to build).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libbpf1 \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log \
        /var/cache/ldconfig/aux-cache
COPY --from=builder /opt/xfrmtrace /opt/xfrmtrace
ENV PATH=/opt/xfrmtrace/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1
ENTRYPOINT ["xfrmtrace"]
