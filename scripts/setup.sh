#!/usr/bin/env bash
# Prepare a fresh Debian 12 machine (as root) for composefs-csi: system packages, a virtual
# environment in .venv and the package installed into it in editable mode with its dev tools.
# Idempotent and quick when nothing changed.
#
#   scripts/setup.sh --e2e   also what the container end-to-end harness needs (`make e2e`):
#                            podman with runc, and mmdebstrap for its registry-free base image.
#                            The harness writes its own podman configuration (CONTAINERS_CONF);
#                            the machine's is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3 python3-venv python3-dev gcc pkg-config   # venv and C extensions (pyfuse3, xxhash)
  fuse3 libfuse3-dev patch                          # FUSE data plane; patched pyfuse3 (patches/)
  nginx curl openssl                                # repositories served over HTTP(S) in tests/bench
  erofs-utils kmod util-linux mount                 # fsck.erofs, modprobe, losetup, mount
  prometheus                                        # evaluates the dashboard's queries in tests
  skopeo umoci docker-registry apache2-utils zstd   # OCI import tests and bench, bench.network's OCI pull
)
if [ "${1:-}" = "--e2e" ]; then
  APT_PACKAGES+=(podman runc mmdebstrap)             # make e2e: containers, the base image
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing system packages: ${missing[*]} (run as root, or install them)" >&2
    exit 1
  fi
  echo "setup: installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating virtual environment .venv"
  "$PY" -m venv .venv
fi
# pyfuse3 with the patches of patches/ (scripts/build-pyfuse3.sh): its version names the
# patch set, so it is rebuilt (into build/pyfuse3, kept between runs) only when that changes.
want_pyfuse3=$(scripts/build-pyfuse3.sh --version)
have_pyfuse3=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("pyfuse3"))' \
  2>/dev/null || true)
if [ "$have_pyfuse3" != "$want_pyfuse3" ]; then
  echo "setup: installing pyfuse3 $want_pyfuse3 (patched) into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  wheel=$(scripts/build-pyfuse3.sh build/pyfuse3 .venv/bin/python)
  .venv/bin/python -m pip install -q --force-reinstall --no-deps "$wheel"
fi
stamp=.venv/.composefs-csi-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing composefs-csi and its dev dependencies into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  echo "$want" > "$stamp"
fi
