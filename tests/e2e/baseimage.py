"""The Python base image, made from Debian packages (no registry is reachable here).

scripts/e2e-base-image.sh holds the recipe and the cache (podman storage, tagged by the hash of
the recipe): this only runs it and returns the image's name, which the build passes as
``PYTHON_IMAGE``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from .podman import Podman, PodmanError

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "e2e-base-image.sh"


def base_image(podman: Podman, log: Path) -> str:
    with open(log, "ab") as err:
        proc = subprocess.run(
            [str(SCRIPT)], env=podman.env, stdout=subprocess.PIPE, stderr=err, check=False
        )
    if proc.returncode != 0:
        raise PodmanError(f"{SCRIPT.name} failed (exit {proc.returncode}); see {log}")
    lines = proc.stdout.decode().split()
    if not lines:
        raise PodmanError(f"{SCRIPT.name} printed no image name; see {log}")
    return lines[-1]
