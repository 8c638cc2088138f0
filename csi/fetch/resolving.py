"""Resolving a ref name to an image digest.

A ref is answered either as the image itself (a server that follows the symlink) or as the
symlink's text (``Content-Type: text/x-symlink-target``). An image answered as the body is
validated and hashed where it arrived (held once: :class:`~csi.fetch.body.BodyBuffer`), and
handed on to the caller with the sizes of its objects so that it need not be fetched again.
"""

from __future__ import annotations

import mmap

from csi.image.errors import FormatError
from csi.image.fsverity import digest_bytes

from .body import BodyBuffer
from .errors import FetchError, SourceInvalid
from .mirrors import Mirrors
from .progress import FetchProgress
from .quoting import quote
from .refs import parse_digest, parse_ref_target, validate_ref_name
from .source import Source

#: (image digest, image bytes or None, object sizes or None): see :func:`resolve_ref`.
Resolution = tuple[bytes, mmap.mmap | None, dict[bytes, int] | None]


def resolve_ref(mirrors: Mirrors, ref: str, progress: FetchProgress | None) -> Resolution:
    """(image digest, image bytes, object sizes): the bytes (a mapping the caller closes)
    and the sizes (from one validating walk) when the ref was served as the image itself.
    A digest reference needs no request."""
    d = parse_digest(ref)
    if d is not None:
        return d, None, None
    try:
        validate_ref_name(ref)
    except FetchError as e:
        e.repository = mirrors.name
        raise
    relpath = f"images/refs/{ref}"
    limit = mirrors.config.max_image_size

    def attempt(src: Source) -> Resolution:
        buf = BodyBuffer()

        def on_data(chunk: bytes) -> None:
            buf.write(chunk)
            if progress is not None:
                progress.downloaded(len(chunk))

        try:
            resp = src.get(relpath, on_data, accept_symlink=True, max_size=limit)
            if resp.symlink_target is not None:
                try:
                    return parse_ref_target(ref, resp.symlink_target), None, None
                except ValueError as e:
                    raise SourceInvalid(str(e)) from None
            n = buf.size
            body = buf.finish()
        finally:
            buf.close()
        return image_body(body, n)

    return mirrors.attempts(f"ref {ref!r}", attempt)


def image_body(body: mmap.mmap | None, n: int) -> Resolution:
    """A ref's body that should be an image: validated, listed and hashed (the mapping is
    closed if it is not an image)."""
    try:
        from csi.image.reader import Image

        if body is None:
            raise FormatError("empty")
        sizes = Image(body).object_sizes()  # validates the whole image
        with memoryview(body) as view:
            digest = digest_bytes(view)
    except FormatError as e:
        if body is not None:
            body.close()
        raise SourceInvalid(
            f"answered {n} bytes that are neither a symlink target nor a "
            f"composefs image ({quote(str(e))})"
        ) from None
    return digest, body, sizes
