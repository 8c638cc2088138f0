"""Resolving a ref name to an image digest.

A ref is answered either as the image itself (a server that follows the symlink) or as the
symlink's text (``Content-Type: text/x-symlink-target``). An image answered as the body is
validated and hashed where it arrived (held once: :class:`~csi.fetch.body.BodyBuffer`), and
handed on to the caller with the sizes of its objects so that it need not be fetched again.

A ref this node resolved before is asked for conditionally (``If-None-Match`` with the
``ETag`` of that answer, else ``If-Modified-Since``), from the mirror that gave the validators:
an unchanged ref then costs one small 304 answer instead of the image.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

from csi.image.errors import FormatError
from csi.image.fsverity import digest_bytes

from .body import BodyBuffer
from .errors import FetchError, SourceInvalid
from .mirrors import Mirrors
from .progress import FetchProgress
from .quoting import quote
from .refs import parse_digest, parse_ref_target, validate_ref_name
from .source import Source, Validators

#: (image digest, image bytes or None, object sizes or None): see :func:`resolve_ref`.
Resolution = tuple[bytes, mmap.mmap | None, dict[bytes, int] | None]


@dataclass(frozen=True, slots=True)
class Known:
    """A ref as this node last resolved it: a conditional request asks ``source`` whether it
    still has the answer that carried ``validators``."""

    digest: bytes
    validators: Validators
    source: str


@dataclass(frozen=True, slots=True)
class Resolved:
    """What :func:`resolve_ref` found. ``body`` (a mapping the caller closes) and ``sizes``
    (from one validating walk) when the ref was served as the image itself; ``validators``
    and ``source`` (the mirror's identity) of the answer, for the next conditional request;
    ``unchanged``: the answer was a 304 (``digest`` is then the known one); ``offline``: no
    mirror could be reached and ``digest`` is this node's last resolution
    (:mod:`csi.fetch.noderefs`); ``received``: bytes downloaded to resolve it, when that is not
    the body's size (a pointer and a delta: :mod:`csi.fetch.pointers`)."""

    digest: bytes
    body: mmap.mmap | None = None
    sizes: dict[bytes, int] | None = None
    validators: Validators | None = None
    source: str | None = None
    unchanged: bool = False
    offline: bool = False
    received: int | None = None

    def close(self) -> None:
        if self.body is not None:
            self.body.close()


def resolve_ref(
    mirrors: Mirrors, ref: str, progress: FetchProgress | None, known: Known | None = None
) -> Resolved:
    """Resolve ``ref`` (see :class:`Resolved`); a digest reference needs no request."""
    d = parse_digest(ref)
    if d is not None:
        return Resolved(d)
    try:
        validate_ref_name(ref)
    except FetchError as e:
        e.repository = mirrors.name
        raise
    relpath = f"images/refs/{ref}"
    limit = mirrors.config.max_image_size

    def attempt(src: Source) -> Resolved:
        buf = BodyBuffer()

        def on_data(chunk: bytes) -> None:
            buf.write(chunk)
            if progress is not None:
                progress.downloaded(len(chunk))

        ask = known.validators if known is not None and known.source == src.identity else None
        try:
            resp = src.get(relpath, on_data, accept_symlink=True, max_size=limit, validators=ask)
            if resp.not_modified and known is not None:
                return Resolved(known.digest, validators=ask, source=src.identity, unchanged=True)
            if resp.symlink_target is not None:
                try:
                    digest = parse_ref_target(ref, resp.symlink_target)
                except ValueError as e:
                    raise SourceInvalid(str(e)) from None
                return Resolved(digest, validators=resp.validators, source=src.identity)
            n = buf.size
            body = buf.finish()
        finally:
            buf.close()
        digest, body, sizes = image_body(body, n)
        return Resolved(digest, body, sizes, resp.validators, src.identity)

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
