#!/usr/bin/env bash
# Pin the container image's Python dependencies: resolve pyproject.toml's runtime dependencies
# (not the dev extras) for Python 3.11 on Linux, and write every distribution with its exact
# version and sha256 hashes to requirements/image.txt. The Dockerfile builds its wheels from that
# file with `pip wheel --require-hashes`, so a build takes the same releases every day and
# refuses a file whose bytes changed.
#
# Run it after changing the dependencies in pyproject.toml, and now and then to take new
# releases (security fixes): `scripts/lock-deps.sh`, then review and commit the diff.
# tests/test_image_lock.py fails when requirements/image.txt no longer satisfies pyproject.toml
# (a dependency added, or a pin outside its range).
#
# pip-tools runs in a throwaway virtual environment; pip uses this machine's configuration.
set -euo pipefail
cd "$(dirname "$0")/.."

PIP_TOOLS_VERSION=7.7.0
out=requirements/image.txt

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "lock-deps: needs Python 3.11 (the image's); set PYTHON" >&2
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q "pip-tools==$PIP_TOOLS_VERSION"
mkdir -p requirements
# --strip-extras: plain pins that pip's hash-checking mode accepts; --allow-unsafe: pin
# setuptools too, should a dependency ever need it at run time.
(
  cd "$tmp"
  CUSTOM_COMPILE_COMMAND="scripts/lock-deps.sh" "$tmp/venv/bin/pip-compile" --quiet \
    --generate-hashes --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links \
    --output-file "$OLDPWD/$out.new" "$OLDPWD/pyproject.toml"
)
# pip-compile names the input by the path it was given; name it relative to the repository.
sed -i "s#$PWD/##g" "$out.new"
mv "$out.new" "$out"
echo "lock-deps: wrote $out ($(grep -c '==' "$out") pinned distributions)"
