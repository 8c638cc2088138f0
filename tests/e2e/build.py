"""Building the project's image from the Dockerfile with podman.

``--format docker`` keeps the Dockerfile's HEALTHCHECK (the OCI format has no field for it); the
host's CA bundle is bind-mounted over the build containers' own, for pip behind an intercepting
proxy; podman's layer cache keeps every unchanged step (the dependency wheels change only with
requirements/image.txt). The image is tagged by its own id, so concurrent runs never retag each
other's images and the same content always gets the same tag.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .podman import Podman, PodmanError

REPO = Path(__file__).resolve().parents[2]
IMAGE = "localhost/composefs-csi-e2e"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def build_image(
    podman: Podman, base: str, work: Path, *, version: str | None = None
) -> tuple[str, float]:
    """Build the Dockerfile on ``base``; returns ``(image reference, seconds)``."""
    iid = work / f"iid-{version or 'default'}"
    log = work / "logs" / f"build-{version or 'default'}.log"
    args = ["build", "--format", "docker", "--layers", "--iidfile", str(iid)]
    args += ["--build-arg", f"PYTHON_IMAGE={base}"]
    if version:
        # The label too: buildah's layer cache reuses the LABEL step whatever the ARG's value.
        args += ["--build-arg", f"VERSION={version}"]
        args += ["--label", f"org.opencontainers.image.version={version}"]
    if os.path.exists(CA_BUNDLE):
        args += ["-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"]
    args += ["-f", str(REPO / "Dockerfile"), str(REPO)]
    t0 = time.monotonic()
    proc = podman.run(*args, check=False, timeout=1800)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise PodmanError(f"podman build failed (exit {proc.returncode}); {log}:\n{tail}")
    image_id = iid.read_text().strip().removeprefix("sha256:")
    ref = f"{IMAGE}:{image_id[:16]}"
    podman.out("tag", image_id, ref)
    return ref, time.monotonic() - t0


def image_size(podman: Podman, ref: str) -> int:
    return int(podman.out("image", "inspect", "--format", "{{.Size}}", ref))


def prune_old_tags(podman: Podman, keep: set[str]) -> None:
    """Remove the harness's image tags built over an hour ago, except ``keep``; an image some
    container still uses stays (rmi refuses). Build steps stay cached either way."""
    refs = podman.out(
        "images",
        "--format",
        "{{.Repository}}:{{.Tag}}",
        "--filter",
        f"reference={IMAGE}",
        "--filter",
        "until=1h",
    ).splitlines()
    for ref in refs:
        if ref and ref not in keep:
            podman.run("rmi", ref, timeout=120, check=False)
