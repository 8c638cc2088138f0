"""The control protocol of the data plane: newline-delimited JSON over a Unix stream socket.

Each request is one line, a JSON object ``{"op": NAME, ...arguments}``; each response is one
line, ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"code": C, "message": M}}``.
A connection may carry any number of requests, answered in order. Operations:

``ping``
    ``{}`` -> ``{"pid", "mountpoint", "views"}``.
``add_view``
    ``{"images": [hex, ...] (lowest first), "holder": str, "lazy": bool, "repository": str|null,
    "composition": bool|null}`` -> ``{"key", "path", "created"}``. One image is an image view
    unless ``composition`` is true; several are a composition. Adding the same holder twice is
    one hold. Images must already be in the store (``images/<hex>``).
``remove_view``
    ``{"key": str, "holder": str}`` -> ``{"removed": bool, "holders": int}``; the view
    disappears when its last holder is removed. Unknown keys or holders are not an error.
``list_views``
    ``{}`` -> ``[{"key", "path", "kind", "images", "holders", "lazy", "open_files"}, ...]``
    (``open_files``: opens the daemon sees; none when the kernel handles opens).
``status``
    ``{"key": str|null, "objects": bool}`` -> ``{"views": [...], "object_fds": int}``; each
    view adds its lazy-fetch ``progress``, and with ``objects`` the number of its objects
    ``missing`` from the store (counted on request).

Error codes: ``invalid_argument``, ``not_found`` (an image is not in the store),
``invalid_image``, ``unavailable``, ``internal``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20


class ControlError(Exception):
    """A request failed; ``code`` is one of the protocol's error codes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


Handler = Callable[[dict[str, Any]], Awaitable[Any]]


async def _answer(handlers: dict[str, Handler], line: bytes) -> dict[str, Any]:
    try:
        req = json.loads(line)
        if not isinstance(req, dict) or not isinstance(req.get("op"), str):
            raise ControlError("invalid_argument", "a request is a JSON object with an 'op'")
        op = req.pop("op")
        fn = handlers.get(op)
        if fn is None:
            raise ControlError("invalid_argument", f"unknown operation {op!r}")
        return {"ok": True, "result": await fn(req)}
    except ControlError as e:
        return {"ok": False, "error": {"code": e.code, "message": e.message}}
    except (ValueError, UnicodeDecodeError) as e:
        return {"ok": False, "error": {"code": "invalid_argument", "message": f"bad JSON: {e}"}}
    except Exception as e:
        log.exception("control request failed")
        return {"ok": False, "error": {"code": "internal", "message": str(e)}}


async def serve_connection(stream: trio.SocketStream, handlers: dict[str, Handler]) -> None:
    buf = b""
    try:
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not line.strip():
                    continue
                reply = await _answer(handlers, line)
                await stream.send_all(json.dumps(reply).encode() + b"\n")
            if len(buf) > MAX_LINE:
                await stream.send_all(
                    json.dumps(
                        {"ok": False, "error": {"code": "invalid_argument", "message": "too long"}}
                    ).encode()
                    + b"\n"
                )
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return
    finally:
        await stream.aclose()


def get_str(req: dict[str, Any], name: str, *, optional: bool = False) -> str | None:
    v = req.get(name)
    if v is None and optional:
        return None
    if not isinstance(v, str) or not v:
        raise ControlError("invalid_argument", f"{name!r} must be a non-empty string")
    return v


def get_bool(req: dict[str, Any], name: str, default: bool | None) -> bool | None:
    v = req.get(name, default)
    if v is not None and not isinstance(v, bool):
        raise ControlError("invalid_argument", f"{name!r} must be true or false")
    return v
