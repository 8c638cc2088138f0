"""What the node plugin needs from the FUSE data plane (a separate process), as an interface.

The data plane serves one node-wide FUSE mount; each image or composition is a subdirectory of
it (a *view*), kept while at least one *holder* holds it. The node plugin holds a view per target
path and bind-mounts the view's directory there.

:class:`FuseDataPlane` adapts the real client (:mod:`csi.fuse.client`); tests may pass any object
with the same methods.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc

from csi.fuse import client

from .errors import CsiError


class DataPlaneUnavailable(Exception):
    """The data plane does not answer (not running, socket missing, broken)."""


@dataclass(frozen=True, slots=True)
class View:
    key: str
    path: Path


class DataPlane(Protocol):
    def ping(self) -> None:
        """Return if the data plane answers; raise :class:`DataPlaneUnavailable` otherwise."""

    def add_view(
        self, images: Sequence[bytes], holder: str, *, lazy: bool, repository: str | None
    ) -> View:
        """Make the view of ``images`` (lowest first) exist and add ``holder`` to its holders
        (idempotent)."""

    def remove_view(self, key: str, holder: str) -> None:
        """Drop ``holder``'s hold on view ``key`` (idempotent); the view goes with its last
        holder."""

    def holders(self) -> Mapping[str, set[str]]:
        """Every view key with its holders."""


class FuseDataPlane:
    """:class:`DataPlane` over :class:`csi.fuse.client.DataPlaneClient` (a Unix socket)."""

    def __init__(self, socket_path: Path, *, timeout: float = 60.0) -> None:
        self.socket_path = Path(socket_path)
        self._client = client.DataPlaneClient(self.socket_path, timeout=timeout)

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self._client, name)(*args, **kwargs)
        except client.DataPlaneUnavailable as e:
            raise DataPlaneUnavailable(
                f"data plane at {self.socket_path} does not answer: {e.message}"
            ) from None
        except client.DataPlaneError as e:
            code = _CODES.get(e.code, grpc.StatusCode.INTERNAL)
            raise CsiError(code, f"data plane: {e.message}") from None

    def ping(self) -> None:
        self._call("ping")

    def add_view(
        self, images: Sequence[bytes], holder: str, *, lazy: bool, repository: str | None
    ) -> View:
        res = self._call("add_view", list(images), holder, lazy=lazy, repository=repository)
        return View(key=str(res["key"]), path=Path(res["path"]))

    def remove_view(self, key: str, holder: str) -> None:
        self._call("remove_view", key, holder)

    def holders(self) -> Mapping[str, set[str]]:
        return {str(v["key"]): {str(h) for h in v["holders"]} for v in self._call("list_views")}


_CODES = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "invalid_image": grpc.StatusCode.DATA_LOSS,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}
