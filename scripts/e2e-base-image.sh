#!/usr/bin/env bash
# A stand-in for python:3.11-slim-bookworm, made from Debian packages without any registry, for
# machines that cannot pull images (the container end-to-end harness, `make e2e`). Prints the
# image name; build with it as `podman build --build-arg PYTHON_IMAGE=<that name> .`.
#
# The image is cached in the machine's podman storage, tagged with the hash of its recipe (this
# file and the Debian sources it uses): it is built only when the recipe changes. About as the
# official image has them: python, python3, pip and pip3 in /usr/local/bin, the Python headers
# (pyfuse3 compiles against them), pip free to install (no EXTERNALLY-MANAGED marker), LANG=C.UTF-8.
#
# Needs root, podman and mmdebstrap (scripts/setup.sh --e2e installs them). Environment:
#   CONTAINERS_CONF   podman configuration (the harness writes one; see docs/e2e.md)
#   E2E_DEBIAN_SOURCES  deb822 sources file to build from (default: this machine's own apt
#                     sources for Debian, /etc/apt/sources.list.d/debian.sources, else the
#                     Debian mirror apt uses by default)
#   E2E_BASE_REBUILD=1  build again even if cached
set -euo pipefail

NAME=localhost/composefs-csi-e2e-base
SUITE=bookworm
PACKAGES=python3,python3-venv,python3-pip,libpython3.11-dev,ca-certificates

self=$(readlink -f "$0")
sources=${E2E_DEBIAN_SOURCES:-/etc/apt/sources.list.d/debian.sources}
tmp=$(mktemp -d /var/tmp/composefs-csi-base.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
if [ -f "$sources" ]; then
  # Only entries for Debian itself (other repositories configured on the machine are not
  # the base image's business).
  awk -v RS= -v ORS='\n\n' '/Suites:[^\n]*bookworm/ && /URIs:[^\n]*debian/' "$sources" > "$tmp/debian.sources"
else
  printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: %s %s-updates\nComponents: main\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\nSuites: %s-security\nComponents: main\n' \
    "$SUITE" "$SUITE" "$SUITE" > "$tmp/debian.sources"
fi
if ! grep -q '^URIs:' "$tmp/debian.sources"; then
  echo "e2e-base-image: no Debian entry for $SUITE in $sources" >&2
  exit 1
fi
# Signed-By paths of the host are fine: the same keyring ships in the chroot's debian-archive-keyring.
hash=$(cat "$self" "$tmp/debian.sources" | sha256sum | cut -c1-16)
image="$NAME:$hash"

exec 9>/var/tmp/composefs-csi-e2e-base.lock
flock 9
if [ "${E2E_BASE_REBUILD:-0}" != 1 ] && podman image exists "$image"; then
  echo "$image"
  exit 0
fi

echo "e2e-base-image: building $image (mmdebstrap $SUITE, --variant=minbase)" >&2
start=$(date +%s)
# The hooks run on the host with the chroot as $1.
# merged-usr hook: /usr merged as in Debian's images, without the usrmerge package (and perl).
mmdebstrap --variant=minbase --include="$PACKAGES" --format=tar \
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
  --customize-hook='for n in python python3; do ln -sf /usr/bin/python3 "$1/usr/local/bin/$n"; done' \
  --customize-hook='for n in pip pip3; do ln -sf /usr/bin/pip3 "$1/usr/local/bin/$n"; done' \
  --customize-hook='rm -f "$1"/usr/lib/python3.*/EXTERNALLY-MANAGED' \
  --customize-hook='rm -f "$1"/usr/lib/python3.*/config-*/libpython3.*.a "$1"/usr/lib/x86_64-linux-gnu/libpython3.*.a' \
  --customize-hook='rm -rf "$1"/usr/share/doc/* "$1"/usr/share/man/* "$1"/usr/share/locale/* "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*' \
  "$SUITE" "$tmp/rootfs.tar" "$tmp/debian.sources" >"$tmp/mmdebstrap.log" 2>&1 || {
  tail -n 30 "$tmp/mmdebstrap.log" >&2
  exit 1
}
podman import --quiet \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["python3"]' \
  --message "composefs-csi e2e base: mmdebstrap $SUITE minbase + $PACKAGES" \
  "$tmp/rootfs.tar" "$image" >/dev/null
echo "e2e-base-image: built $image in $(( $(date +%s) - start )) s" >&2
# Older recipes' images are of no further use (an image still in use stays: rmi refuses).
podman images --format '{{.Repository}}:{{.Tag}}' --filter "reference=$NAME" | grep -vxF "$image" |
  xargs -r podman rmi >/dev/null 2>&1 || true
echo "$image"
