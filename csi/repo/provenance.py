"""Where an image came from: small JSON records beside the repository layout.

::

    provenance/images/<64 hex>.json   {"image": "sha256:<hex>", "sources": [record, ...]}
    provenance/refs/<name>.json       {"image": "sha256:<hex>", ...record}

A record says what the image was made from (``composefs-csi import``: the source as written,
the manifest and config digests, the platform, the layer digests). They live outside
``objects/`` and ``images/``, so the image digest stays a pure function of the tree (the same
source imported twice gives the same image) and composefs-rs, which knows only ``objects/``,
``images/`` and ``streams/``, ignores them. A static server publishes them with the rest.

An image may come from several sources (the same tree published twice): its file lists each
once. A ref's file describes the import that set the ref; readers ignore it when the ref has
since been moved to another image (:func:`ref_record` checks). Files are replaced atomically.
"""

from __future__ import annotations

import json
from typing import Any

from . import layout
from .errors import RepoError
from .repository import Repository

PROVENANCE_DIR = "provenance"
_LIMIT = 1 << 20


def _image_file(repo: Repository, digest: bytes) -> str:
    return f"{repo.root}/{PROVENANCE_DIR}/images/{layout.check_digest(digest).hex()}.json"


def _ref_file(repo: Repository, name: str) -> str:
    return f"{repo.root}/{PROVENANCE_DIR}/refs/{layout.validate_ref_name(name)}.json"


def _read(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            raw = f.read(_LIMIT + 1)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if len(raw) > _LIMIT:
        return None
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _write(repo: Repository, path: str, doc: dict[str, Any]) -> None:
    data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    repo.write_file(path, data, tag="provenance")


def record_image(repo: Repository, digest: bytes, record: dict[str, Any]) -> None:
    """Add ``record`` to the sources of image ``digest`` (once, however often recorded)."""
    path = _image_file(repo, digest)
    with repo.tmp.lock(f"provenance-{digest.hex()}"):
        doc = _read(path) or {}
        sources = [s for s in doc.get("sources", []) if isinstance(s, dict)]
        if record not in sources:
            sources.append(record)
        sources.sort(key=lambda s: json.dumps(s, sort_keys=True))
        _write(repo, path, {"image": f"sha256:{digest.hex()}", "sources": sources})


def record_ref(repo: Repository, name: str, digest: bytes, record: dict[str, Any]) -> None:
    """Describe the import that is about to point ref ``name`` at image ``digest``."""
    _write(repo, _ref_file(repo, name), {**record, "image": f"sha256:{digest.hex()}"})


def image_sources(repo: Repository, digest: bytes) -> list[dict[str, Any]]:
    doc = _read(_image_file(repo, digest))
    if doc is None:
        return []
    return [s for s in doc.get("sources", []) if isinstance(s, dict)]


def ref_record(repo: Repository, name: str) -> dict[str, Any] | None:
    """The record of the import that set ref ``name``, if the ref still names that image."""
    doc = _read(_ref_file(repo, name))
    if doc is None:
        return None
    try:
        current = repo.resolve_ref(name)
    except (RepoError, OSError):
        return None
    return doc if doc.get("image") == f"sha256:{current.hex()}" else None
