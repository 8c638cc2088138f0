"""What the fetcher needs to know about an image beyond the store's object list: sizes."""

from __future__ import annotations

import os

from csi.image.errors import FormatError
from csi.image.reader import Image


def object_sizes(path: str | os.PathLike[str]) -> dict[bytes, int]:
    """Declared content size of every object an image file references (largest if an object is
    referenced with different sizes; a lying image only makes the download fail its digest).
    Empty if the image cannot be read: sizes only serve progress and early size checks."""
    try:
        with Image.open(path) as img:
            return img.object_sizes()
    except (OSError, FormatError):
        return {}
