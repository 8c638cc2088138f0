"""Readiness checks for Identity.Probe: each returns None when fine, else the reason."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .dataplane import DataPlane, DataPlaneUnavailable
from .identity import Check


def store_writable(root: Path) -> Check:
    def check() -> str | None:
        try:
            with tempfile.NamedTemporaryFile(dir=root, prefix=".probe-"):
                pass
        except OSError as e:
            return f"the store at {root} is not writable: {e.strerror}"
        return None

    return check


def fuse_usable(device: str = "/dev/fuse") -> Check:
    def check() -> str | None:
        try:
            fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            return f"{device} is not usable: {e.strerror}"
        os.close(fd)
        return None

    return check


def dataplane_answers(dataplane: DataPlane) -> Check:
    def check() -> str | None:
        try:
            dataplane.ping()
        except DataPlaneUnavailable as e:
            return f"the FUSE data plane does not answer: {e}"
        return None

    return check
