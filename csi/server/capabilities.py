"""Checks of the ``volume_capability`` fields the CO sends."""

from __future__ import annotations

from collections.abc import Iterable

from .errors import invalid, missing
from .proto import csi_pb2 as pb

Mode = pb.VolumeCapability.AccessMode
READER_MODES = frozenset({Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY})


def check_capability(cap: pb.VolumeCapability, field: str = "volume_capability") -> None:
    """Accept mount volumes in any access mode (Kubernetes and conformance tools ask for
    SINGLE_NODE_WRITER with readonly=false); we always mount read-only. Refuse block volumes."""
    if not cap.HasField("access_mode"):
        raise missing(f"{field}.access_mode")
    if cap.access_mode.mode == Mode.UNKNOWN:
        raise invalid(f"{field}.access_mode: mode UNKNOWN is not an access mode")
    if cap.HasField("block"):
        raise invalid(f"{field}: block volumes are not supported (composefs volumes are mounts)")


def only_readers(caps: Iterable[pb.VolumeCapability]) -> str | None:
    """None if every capability is a read-only mount; else why not."""
    for cap in caps:
        if cap.HasField("block"):
            return "block volumes are not supported"
        if cap.access_mode.mode not in READER_MODES:
            name = pb.VolumeCapability.AccessMode.Mode.Name(cap.access_mode.mode)
            return f"access mode {name} is not supported: volumes are read-only"
    return None
