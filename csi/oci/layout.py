"""``oci:DIR[:TAG]``: an OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/``).

The tag is matched against the ``org.opencontainers.image.ref.name`` annotation of the
entries of ``index.json``; without a tag the index must have exactly one entry. Blobs are
read from ``blobs/<algorithm>/<hex>`` (digests are validated first, so no other path can be
named) and checked like blobs from a registry.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import BinaryIO

from .digests import Digest, check_bytes
from .errors import DigestError, FormatError, NotFoundError
from .manifest import MANIFEST_LIMIT, REF_NAME, Descriptor, Index, parse_manifest
from .reference import LayoutRef
from .source import ManifestSource
from .streams import FileSlice


class _OpenSlice(FileSlice):
    """A blob file, closed with the reader."""

    def __init__(self, f: BinaryIO, length: int) -> None:
        super().__init__(f, 0, length)
        self._file = f

    def close(self) -> None:
        super().close()
        self._file.close()


class LayoutSource(ManifestSource):
    def __init__(self, ref: LayoutRef) -> None:
        self.ref = ref
        self.root = Path(ref.path)
        self.label = str(ref)
        marker = self.root / "oci-layout"
        try:
            doc = json.loads(marker.read_bytes())
        except FileNotFoundError:
            raise NotFoundError(f"{self.label}: {marker} not found (not an OCI layout)") from None
        except (OSError, ValueError) as e:
            raise FormatError(f"{self.label}: cannot read {marker}: {e}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("imageLayoutVersion"), str):
            raise FormatError(f"{marker}: no imageLayoutVersion")

    def _path(self, digest: Digest) -> Path:
        return self.root / "blobs" / digest.algorithm / digest.hex

    def _read(self, desc: Descriptor, limit: int, what: str) -> bytes:
        if desc.size > limit:
            raise FormatError(f"{what}: {desc.size} bytes, above the {limit}-byte limit")
        try:
            with open(self._path(desc.digest), "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            raise NotFoundError(f"{what}: blob {desc.digest} missing from {self.root}") from None
        check_bytes(data, desc.digest, what, desc.size)
        return data

    def top(self) -> tuple[bytes, str, Digest]:
        index_path = self.root / "index.json"
        try:
            raw = index_path.read_bytes()
        except OSError as e:
            raise NotFoundError(f"{self.label}: cannot read {index_path}: {e.strerror}") from None
        index = parse_manifest(raw, None, str(index_path))
        if not isinstance(index, Index):
            raise FormatError(f"{index_path}: not an image index")
        tag = self.ref.tag
        if tag is None:
            if len(index.manifests) != 1:
                tags = sorted(d.annotations.get(REF_NAME, "?") for d in index.manifests)
                raise NotFoundError(
                    f"{self.label}: the layout holds {len(index.manifests)} images "
                    f"(tags: {', '.join(tags) or 'none'}); name one with oci:DIR:TAG"
                )
            desc = index.manifests[0]
        else:
            found = [d for d in index.manifests if d.annotations.get(REF_NAME) == tag]
            if not found:
                raise NotFoundError(f"{self.label}: no image tagged {tag!r} in {index_path}")
            desc = found[0]
        data = self._read(desc, MANIFEST_LIMIT, f"{self.label}: manifest {desc.digest}")
        return data, desc.media_type, desc.digest

    def manifest(self, desc: Descriptor) -> tuple[bytes, str]:
        return self._read(desc, MANIFEST_LIMIT, f"{self.label}: manifest {desc.digest}"), ""

    def blob(self, desc: Descriptor, limit: int) -> bytes:
        return self._read(desc, limit, f"{self.label}: blob {desc.digest}")

    def open_blob(self, desc: Descriptor) -> FileSlice:
        path = self._path(desc.digest)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed with the reader
        except FileNotFoundError:
            raise NotFoundError(f"{self.label}: blob {desc.digest} missing") from None
        size = os.fstat(f.fileno()).st_size
        if size != desc.size:
            f.close()
            raise DigestError(
                f"{self.label}: blob {desc.digest} has {size} bytes, its descriptor says "
                f"{desc.size}"
            )
        return _OpenSlice(f, size)
