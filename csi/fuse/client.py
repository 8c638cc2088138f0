"""Synchronous client of the data plane's control socket (used by the CSI node plugin)."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class DataPlaneError(Exception):
    """The data plane answered with an error (``code`` as in :mod:`csi.fuse.control`)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class DataPlaneUnavailable(DataPlaneError):
    """The daemon could not be reached (not running, socket missing, connection broken)."""

    def __init__(self, message: str) -> None:
        super().__init__("unavailable", message)


class DataPlaneClient:
    """One request per connection; thread-safe (no shared connection state)."""

    def __init__(self, socket_path: str | os.PathLike[str], *, timeout: float = 120.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    def call(self, op: str, **args: Any) -> Any:
        req = json.dumps({"op": op, **args}).encode() + b"\n"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            try:
                s.connect(os.fspath(self.socket_path))
            except OSError as e:
                raise DataPlaneUnavailable(f"{self.socket_path}: {e.strerror or e}") from None
            s.sendall(req)
            buf = b""
            while b"\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    raise DataPlaneUnavailable("connection closed before the answer")
                buf += chunk
        except TimeoutError:
            raise DataPlaneUnavailable(f"no answer within {self.timeout} s") from None
        except OSError as e:
            raise DataPlaneUnavailable(str(e)) from None
        finally:
            s.close()
        reply = json.loads(buf.split(b"\n", 1)[0])
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise DataPlaneError(str(err.get("code", "internal")), str(err.get("message", "")))
        return reply.get("result")

    # -- operations ------------------------------------------------------------------------

    def ping(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("ping")
        return result

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        """Ping until the daemon answers (it answers only once its mount is up)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.ping()
            except DataPlaneUnavailable:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def add_view(
        self,
        images: Sequence[str | bytes],
        holder: str,
        *,
        lazy: bool = False,
        repository: str | None = None,
        composition: bool | None = None,
    ) -> dict[str, Any]:
        """Serve ``images`` (digests, lowest first) for ``holder``; returns key and path."""
        hexes = [d.hex() if isinstance(d, bytes) else d for d in images]
        result: dict[str, Any] = self.call(
            "add_view",
            images=hexes,
            holder=holder,
            lazy=lazy,
            repository=repository,
            composition=composition,
        )
        return result

    def remove_view(self, key: str, holder: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("remove_view", key=key, holder=holder)
        return result

    def list_views(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call("list_views")
        return result

    def status(self, key: str | None = None, *, objects: bool = False) -> dict[str, Any]:
        result: dict[str, Any] = self.call("status", key=key, objects=objects)
        return result
