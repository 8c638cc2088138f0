# syntax=docker/dockerfile:1
# composefs-csi: one image for the data plane, the node plugin, the controller and the CLI.
#
#   docker build -t composefs-csi:0.1.0 .
#
# Stage "build" compiles the wheels with C extensions (pyfuse3 with the patches of patches/,
# pycurl, xxhash) against the -dev packages; the runtime stage installs those wheels into a
# venv next to the shared libraries only (fuse3, libcurl), without compilers or headers.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      gcc libc6-dev pkg-config libfuse3-dev libcurl4-openssl-dev libssl-dev patch \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# pyfuse3 as scripts/setup.sh installs it: the pinned sdist (SHA-256 checked) with the
# patches of patches/ (kernel-handled opens and cached listings in the data plane).
COPY patches ./patches
COPY scripts/build-pyfuse3.sh ./scripts/build-pyfuse3.sh
RUN scripts/build-pyfuse3.sh /pyfuse3 python
COPY pyproject.toml README.md ./
COPY csi ./csi
# Wheels of the package and of every dependency (pycurl is built here); naming the patched
# pyfuse3 wheel makes pip use it rather than any pyfuse3 from PyPI.
RUN pip wheel --no-cache-dir --wheel-dir /wheels /pyfuse3/pyfuse3-*.whl .

FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="composefs-csi" \
      org.opencontainers.image.description="Kubernetes CSI driver serving read-only composefs images over FUSE" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# fuse3: libfuse3 and fusermount3; libcurl4: pycurl's library; mount: util-linux mount/umount.
RUN apt-get update \
 && apt-get install -y --no-install-recommends fuse3 libcurl4 ca-certificates mount \
 && rm -rf /var/lib/apt/lists/*
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv /opt/composefs-csi \
 && /opt/composefs-csi/bin/pip install --no-cache-dir --no-index --find-links=/wheels composefs-csi \
 && /opt/composefs-csi/bin/pip uninstall -y pip \
 && /opt/composefs-csi/bin/composefs-csi --version
ENV PATH=/opt/composefs-csi/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CSI_ENDPOINT=unix:///csi/csi.sock

# Non-root by default (the controller and the CLI need nothing more). The data plane and the
# node plugin mount filesystems: the chart runs them as root in privileged containers.
USER 65532:65532

# Calls the CSI Identity.Probe of the node plugin or controller on $CSI_ENDPOINT (kubelet ignores
# HEALTHCHECK; the chart uses the livenessprobe sidecar instead). Not meaningful for the data
# plane, which has no CSI socket.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
  CMD ["composefs-csi", "probe"]

ENTRYPOINT ["composefs-csi"]
CMD ["--help"]
