"""Resolving a ref through its pointer, to fetch a new image as a delta (:mod:`csi.repo.refdeltas`).

Tried before the usual resolution (:func:`csi.fetch.resolving.resolve_ref`) when the node holds
images already and the first mirror is HTTP(S). Each step is one small request:

1. for a ref this node resolved before, the ref's first byte, conditionally (``If-None-Match``
   its last ``ETag``): a 304 ends here, as the usual resolution would;
2. the ref's pointer, ``packs/refs/<name>``: the image the publisher last pointed the ref at,
   and the deltas to it (a 404 ends here: the usual resolution runs);
3. the ref's first byte, if step 1 did not ask: its ``ETag`` now;
4. ``images/<hex>`` of the pointer's image, first byte only: the same ``ETag`` as the ref's
   says the ref serves that image (for nginx the same file, for a bucket the same contents).
   A ref moved by another tool, without its pointer, fails here;
5. if the image is on the node already, nothing more; else a delta from an image the node
   holds, applied, and the image it makes checked against the pointer's digest.

Anything that does not work out returns None, and the usual resolution runs: the pointer only
ever saves bytes. A repository without pointers is not asked again for 10 minutes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from csi.repo.refdeltas import (
    MAX_POINTER,
    PointerError,
    apply_delta,
    delta_relpath,
    parse_pointer,
    pointer_relpath,
)
from csi.store import Store

from .body import BodyBuffer
from .errors import FetchError, SourceError, SourceInvalid, SourceNotFound, Unreachable
from .http import HttpSource
from .mirrors import Mirrors
from .progress import FetchProgress
from .refs import validate_ref_name
from .resolving import Known, Resolved, image_body
from .source import Response, Validators

log = logging.getLogger(__name__)

#: How long a mirror that answered 404 for a pointer is not asked for pointers again.
NO_POINTERS_FOR = 600.0
_no_pointers: dict[str, float] = {}


def resolve_with_delta(
    mirrors: Mirrors,
    ref: str,
    store: Store,
    known: Known | None,
    progress: FetchProgress | None,
) -> Resolved | None:
    """``ref`` resolved through its pointer (see the module doc), or None."""
    src = mirrors.sources[0]
    if not isinstance(src, HttpSource) or not store.holds_images():
        return None
    try:
        validate_ref_name(ref)
    except FetchError:
        return None  # the usual resolution says what is wrong with it
    if _no_pointers.get(src.identity, 0.0) > time.monotonic():
        return None
    try:
        return _resolve(mirrors, src, ref, store, known, progress)
    except Unreachable:
        if len(mirrors.sources) == 1:
            raise  # the usual resolution would fail the same way: let the caller go offline
        return None
    except SourceError as e:
        log.info(
            "repository %r: ref %r not resolved through its pointer (%s); asking for the ref",
            mirrors.name,
            ref,
            mirrors.safe(e),
        )
        return None


def _probe_ref(
    src: HttpSource, ref: str, count: Callable[[bytes], None], ask: Validators | None
) -> Response:
    """The ref's first byte (or a 304 when ``ask`` still holds): what identifies it now."""
    return src.get(f"images/refs/{ref}", count, accept_symlink=True, span=(0, 1), validators=ask)


def _resolve(
    mirrors: Mirrors,
    src: HttpSource,
    ref: str,
    store: Store,
    known: Known | None,
    progress: FetchProgress | None,
) -> Resolved | None:
    received = 0

    def count(chunk: bytes) -> None:
        nonlocal received
        received += len(chunk)
        if progress is not None:
            progress.downloaded(len(chunk))

    # A ref this node knows is asked about first: unchanged, that one small request is all.
    probe = None
    if known is not None and known.source == src.identity and known.validators.etag:
        ask = Validators(etag=known.validators.etag)
        probe = _probe_ref(src, ref, count, ask)
        if probe.not_modified:
            return Resolved(known.digest, validators=ask, source=src.identity, unchanged=True)
    chunks: list[bytes] = []
    try:
        src.get(pointer_relpath(ref), chunks.append, max_size=MAX_POINTER)
    except SourceNotFound:
        _no_pointers[src.identity] = time.monotonic() + NO_POINTERS_FOR
        return None
    text = b"".join(chunks)
    count(text)
    try:
        pointer = parse_pointer(text)
        if pointer.size > mirrors.config.max_image_size:
            raise PointerError(f"an image of {pointer.size} bytes: over max_image_size")
    except PointerError as e:
        log.warning("repository %r: unusable pointer of ref %r: %s", mirrors.name, ref, e)
        return None
    if probe is None:
        probe = _probe_ref(src, ref, count, None)
    etag = probe.validators.etag if probe.validators else None
    if probe.symlink_target is not None or not etag:
        return None  # a ref answered as its link text costs nothing anyway; no ETag: no check
    image = src.get(f"images/{pointer.image.hex()}", count, accept_symlink=True, span=(0, 1))
    if image.validators is None or image.validators.etag != etag:
        log.info(
            "repository %r: the pointer of ref %r names image %s, which the ref does not serve "
            "(moved without its pointer?); asking for the ref",
            mirrors.name,
            ref,
            pointer.image.hex(),
        )
        return None
    validators = Validators(etag, probe.validators.last_modified if probe.validators else None)
    if store.has_image(pointer.image):
        return Resolved(
            pointer.image, validators=validators, source=src.identity, received=received
        )
    for base, length in pointer.deltas:
        if length > pointer.size or not store.has_image(base):
            continue
        chunks = []
        src.get(delta_relpath(pointer.image, base), chunks.append, max_size=length)
        delta = b"".join(chunks)
        count(delta)
        try:
            with open(store.object_path(base), "rb") as f:
                made = apply_delta(f.read(), delta, pointer.size)
        except (OSError, ValueError) as e:
            log.warning(
                "repository %r: delta %s -> %s of ref %r unusable: %s",
                mirrors.name,
                base.hex(),
                pointer.image.hex(),
                ref,
                e,
            )
            continue
        buf = BodyBuffer()
        try:
            buf.write(made)
            body = buf.finish()
        finally:
            buf.close()
        del made
        try:
            digest, body, sizes = image_body(body, pointer.size)
        except SourceInvalid as e:
            log.warning("repository %r: delta of ref %r: %s", mirrors.name, ref, e)
            continue
        if digest != pointer.image:
            assert body is not None
            body.close()
            log.warning(
                "repository %r: delta of ref %r made image %s, not %s",
                mirrors.name,
                ref,
                digest.hex(),
                pointer.image.hex(),
            )
            continue
        log.info(
            "repository %r: ref %r: image %s from a %d-byte delta against %s",
            mirrors.name,
            ref,
            digest.hex(),
            length,
            base.hex(),
        )
        return Resolved(digest, body, sizes, validators, src.identity, received=received)
    return None
