"""Helpers shared by the repository and store tests."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from csi.image.fsverity import digest_bytes
from csi.store import ObjectWriter, Store

FAKE_MAGIC = b"FAKEIMG\0"


def blob(seed: int | str, size: int = 1000) -> bytes:
    """Deterministic pseudo-random content of ``size`` bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def fake_image(objects: Iterable[bytes], nonce: bytes = b"") -> bytes:
    """A stand-in image for tests of store logic: magic, 8-byte nonce, object digests."""
    return FAKE_MAGIC + nonce.ljust(8, b"\0")[:8] + b"".join(sorted(objects))


def fake_parser(data: bytes) -> set[bytes]:
    if not data.startswith(FAKE_MAGIC) or (len(data) - 16) % 32:
        raise ValueError("not a fake image")
    body = data[16:]
    return {body[i : i + 32] for i in range(0, len(body), 32)}


def writing(data: bytes):  # type: ignore[no-untyped-def]
    def fill(w: ObjectWriter) -> None:
        w.write(data)

    return fill


def put(store: Store, data: bytes) -> bytes:
    d = digest_bytes(data)
    store.ensure(d, writing(data), size_hint=len(data))
    return d


def files_under(path: Path) -> list[str]:
    out = []
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            out.append(os.path.relpath(os.path.join(dirpath, f), path))
    return sorted(out)


def temp_files(root: Path) -> list[str]:
    """Temp files (not lock files, nor the owner files of live processes) left in the store's
    temp area."""
    return [f for f in files_under(root / ".tmp") if not f.startswith(("locks/", "owners/"))]


def real_image(contents: Iterable[bytes]) -> tuple[bytes, set[bytes]]:
    """A real composefs image (our writer) whose files are ``contents``; (image, digests)."""
    from csi.image.tree import S_IFREG, Node, Tree, object_path
    from csi.image.writer import write_image

    t = Tree.empty()
    digests = set()
    for i, data in enumerate(contents):
        d = digest_bytes(data)
        digests.add(d)
        t.root.add(
            b"f%04d" % i,
            Node(mode=S_IFREG | 0o644, size=len(data), digest=d, payload=object_path(d)),
        )
    return write_image(t), digests
