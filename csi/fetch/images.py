"""What the fetcher needs to know about an image beyond the store's object list: sizes."""

from __future__ import annotations

import os
import re

from csi.image.errors import FormatError
from csi.image.reader import Image

_OBJECT_PATH = re.compile(rb"[0-9a-f]{2}/[0-9a-f]{62}")


def object_sizes(path: str | os.PathLike[str]) -> dict[bytes, int]:
    """Declared content size of every object an image file references (largest if an object is
    referenced with different sizes; a lying image only makes the download fail its digest).
    Empty if the image cannot be read: sizes only serve progress and early size checks."""
    out: dict[bytes, int] = {}
    try:
        with Image.open(path) as img:
            for nid, payload, digest in img.object_refs():
                if digest is None and _OBJECT_PATH.fullmatch(payload):
                    digest = bytes.fromhex((payload[:2] + payload[3:]).decode())
                if digest is None:
                    continue
                size = img.getattr(nid).size
                if size > out.get(digest, -1):
                    out[digest] = size
    except (OSError, FormatError):
        return {}
    return out
