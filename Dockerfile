# syntax=docker/dockerfile:1
# composefs-csi: one image for the data plane, the node plugin, the controller and the CLI.
#
#   docker build -t composefs-csi:0.1.0 .
#
# Stage "build" makes a wheel of every Python dependency, at the versions and with the hashes
# pinned in requirements/image.txt (scripts/lock-deps.sh keeps it current), and of the package,
# and installs them into a venv without pip or setuptools. Only pyfuse3 is compiled there: its
# pinned sdist (SHA-256 checked) with the patches of patches/, as scripts/setup.sh builds it
# (scripts/build-pyfuse3.sh), against libfuse3's headers; every other dependency comes as a
# manylinux wheel with its own libraries (pycurl bundles its libcurl and OpenSSL). The runtime
# stage copies the venv next to libfuse3. (A COPY, not a RUN with a bind mount of the build
# stage: buildah's layer cache does not look at a mount's content, and would keep a stale venv
# after a code change.)
#
# PYTHON_IMAGE: any Debian bookworm image with Python 3.11 and pip in /usr/local/bin and the
# Python headers (the official image has them; `make e2e` builds a stand-in from Debian packages).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev pkg-config libfuse3-dev patch \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# pyfuse3 with the patches of patches/ (kernel-handled opens and cached listings in the data
# plane): this wheel replaces the lock's pyfuse3, whose sdist hash build-pyfuse3.sh checks.
COPY patches ./patches
COPY scripts/build-pyfuse3.sh ./scripts/build-pyfuse3.sh
RUN scripts/build-pyfuse3.sh /pyfuse3 python
# The dependencies (this layer changes only with the lock): wheels of exactly the pinned files,
# every one checked against its hash, installed with the patched pyfuse3 into a venv made
# without pip or setuptools (the base image's pip installs into it, from those wheels only).
COPY requirements/image.txt requirements/
RUN awk '/^pyfuse3==/ {skip = 1; next} skip && /^[[:space:]]/ {next} {skip = 0; print}' \
      requirements/image.txt > /tmp/lock-without-pyfuse3.txt \
 && pip wheel --no-cache-dir --require-hashes --wheel-dir /wheels -r /tmp/lock-without-pyfuse3.txt \
 && python -m venv --without-pip /opt/composefs-csi \
 && pip --python /opt/composefs-csi/bin/python install --no-cache-dir --no-index --no-deps \
      --disable-pip-version-check --root-user-action=ignore /wheels/*.whl /pyfuse3/pyfuse3-*.whl
COPY pyproject.toml README.md ./
COPY csi ./csi
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /tmp/package . \
 && pip --python /opt/composefs-csi/bin/python install --no-cache-dir --no-index --no-deps \
      --disable-pip-version-check --root-user-action=ignore /tmp/package/*.whl \
 && pip --python /opt/composefs-csi/bin/python check --disable-pip-version-check

FROM ${PYTHON_IMAGE} AS runtime
# libfuse3-3: pyfuse3's library (the data plane mounts as root, so no fusermount3 is needed).
# ca-certificates: https repositories. apt's caches go too (/var/cache/apt/*.bin).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libfuse3-3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
# The venv as the build stage made it (its python is the base image's, the same in both stages).
COPY --from=build /opt/composefs-csi /opt/composefs-csi
ENV PATH=/opt/composefs-csi/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CSI_ENDPOINT=unix:///csi/csi.sock
RUN composefs-csi --version

# Non-root by default (the controller and the CLI need nothing more). The data plane and the
# node plugin mount filesystems: the chart runs them as root in privileged containers.
USER 65532:65532

# For docker and podman users: calls the CSI Identity.Probe of the node plugin or controller on
# $CSI_ENDPOINT. Not meaningful for the data plane, which has no CSI socket. Kubernetes ignores
# HEALTHCHECK (the chart runs the livenessprobe sidecar instead), and the OCI image format has
# no field for it: `podman build` keeps it only with --format docker.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
  CMD ["composefs-csi", "probe"]

ENTRYPOINT ["composefs-csi"]
CMD ["--help"]

# Last, so that a new version reuses every layer above.
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="composefs-csi" \
      org.opencontainers.image.description="Kubernetes CSI driver serving read-only composefs images over FUSE" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
