#!/usr/bin/env bash
# Build the pyfuse3 wheel composefs-csi runs with: the pinned pyfuse3 sdist from PyPI (its
# SHA-256 checked) with the patches of patches/pyfuse3-<version>-*.patch applied.
#
#   scripts/build-pyfuse3.sh --version          print the version the wheel gets
#                                                (<version>+cfs.<hash of sdist and patches>)
#   scripts/build-pyfuse3.sh OUTDIR [PYTHON]    build it into OUTDIR (reused when already
#                                                there) and print its path
#
# Needs PYTHON (default python3) with pip, gcc, pkg-config, libfuse3-dev and patch(1); pip
# fetches the sdist (kept in OUTDIR) and the build tools (setuptools, setuptools_scm, Cython)
# from PyPI. Used by scripts/setup.sh and the Dockerfile.
set -euo pipefail
cd "$(dirname "$0")/.."

PYFUSE3_VERSION=3.5.0
PYFUSE3_SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24

shopt -s nullglob
patches=(patches/pyfuse3-"$PYFUSE3_VERSION"-*.patch)
if [ ${#patches[@]} -eq 0 ]; then
  echo "build-pyfuse3: no patches/pyfuse3-$PYFUSE3_VERSION-*.patch" >&2
  exit 1
fi
tag=$({ echo "$PYFUSE3_SHA256"; cat "${patches[@]}"; } | sha256sum | cut -c1-12)
version="$PYFUSE3_VERSION+cfs.$tag"
if [ "${1:-}" = "--version" ]; then
  echo "$version"
  exit 0
fi
if [ $# -lt 1 ]; then
  echo "usage: $0 OUTDIR [PYTHON] | --version" >&2
  exit 2
fi
out=$1
py=${2:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd)

pytag=$("$py" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
for whl in "$out"/pyfuse3-"$version"-"$pytag"-*.whl; do
  echo "$whl"
  exit 0
done

sdist="$out/pyfuse3-$PYFUSE3_VERSION.tar.gz"
if [ ! -f "$sdist" ] || ! echo "$PYFUSE3_SHA256  $sdist" | sha256sum -c --status; then
  rm -f "$sdist"
  "$py" -m pip download -q --no-binary :all: --no-deps --dest "$out" "pyfuse3==$PYFUSE3_VERSION" >&2
  if ! echo "$PYFUSE3_SHA256  $sdist" | sha256sum -c --status; then
    echo "build-pyfuse3: $sdist does not have the pinned SHA-256 $PYFUSE3_SHA256" >&2
    rm -f "$sdist"
    exit 1
  fi
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar -xzf "$sdist" -C "$work" --no-same-owner
src="$work/pyfuse3-$PYFUSE3_VERSION"
for p in "${patches[@]}"; do
  patch -d "$src" -p1 --batch --forward --quiet < "$p" >&2
done
# The sdist ships the C file Cython made from the unpatched sources: make it again.
rm -f "$src/src/pyfuse3/__init__.c"
echo "build-pyfuse3: building pyfuse3 $version" >&2
SETUPTOOLS_SCM_PRETEND_VERSION="$version" \
  "$py" -m pip wheel -q --no-deps --no-cache-dir --wheel-dir "$work/wheel" "$src" >&2
whl=$(ls "$work"/wheel/pyfuse3-*.whl)
mv "$whl" "$out/"
echo "$out/$(basename "$whl")"
