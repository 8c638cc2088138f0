#!/usr/bin/env bash
# Prepare a fresh Debian 12 machine (as root) for composefs-csi: system packages, a virtual
# environment in .venv and the package installed into it in editable mode with its dev tools.
# Idempotent and quick when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3 python3-venv python3-dev gcc pkg-config   # venv and C extensions (pyfuse3, xxhash)
  fuse3 libfuse3-dev                                # FUSE data plane
  nginx curl openssl                                # repositories served over HTTP(S) in tests/bench
  erofs-utils kmod util-linux mount                 # fsck.erofs, modprobe, losetup, mount
  prometheus                                        # evaluates the dashboard's queries in tests
  docker-registry skopeo umoci                      # the OCI pull bench.network compares with
)

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
stamp=.venv/.composefs-csi-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing composefs-csi and its dev dependencies into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  echo "$want" > "$stamp"
fi
