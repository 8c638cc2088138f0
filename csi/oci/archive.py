"""``docker-archive:FILE[:NAME:TAG | :@INDEX]``: a ``docker save`` (or ``skopeo copy
docker-archive:``) tarball.

The archive is indexed once by reading its headers only (contents are skipped with seeks),
then ``manifest.json`` picks the image: the one named (matched against its ``RepoTags``, both
sides normalised as Docker references), the ``@INDEX``-th, or the only one. Its config is
checked against the digest its file name carries (``<hex>.json`` or ``blobs/sha256/<hex>``);
its layers are read in place and checked against the config's diff_ids (the archive does not
name compressed layers by digest, except as ``blobs/sha256/<hex>``, which is checked too).
Symlinked members (the legacy ``<id>/layer.tar``) are followed inside the archive.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from dataclasses import dataclass
from typing import Any, BinaryIO

from .digests import Digest, check_bytes, parse_digest
from .errors import FormatError, NotFoundError, OciError, SourceSyntaxError
from .manifest import CONFIG_LIMIT, Platform, parse_config
from .reference import ArchiveRef, parse_docker
from .source import Layer, Resolved, Source
from .streams import ByteReader, FileSlice
from .tarstream import LINK, REG, SYMLINK, TarReader

MANIFEST_LIMIT = 16 << 20
_DIGEST_NAME = re.compile(r"(?:blobs/sha256/|)([0-9a-f]{64})(?:\.json|\.tar)?")
LAYER_MEDIA_TYPE = "application/vnd.docker.image.rootfs.diff.tar"


@dataclass
class _Member:
    offset: int
    size: int
    kind: bytes
    link: str


class _FileReader(ByteReader):
    """A :class:`ByteReader` over a seekable file: skipping is seeking."""

    def __init__(self, f: BinaryIO) -> None:
        super().__init__(lambda: b"")
        self._fd = f.fileno()
        self._end = os.fstat(self._fd).st_size

    def read_exact(self, n: int) -> bytes | None:
        if self.pos >= self._end:
            return None
        data = os.pread(self._fd, n, self.pos)
        if len(data) < n:
            raise EOFError(f"{len(data)} of {n} bytes")
        self.pos += n
        return data

    def readinto(self, out: memoryview) -> int:
        data = os.pread(self._fd, len(out), self.pos)
        out[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def skip(self, n: int) -> None:
        if self.pos + n > self._end:
            raise EOFError(f"{n} bytes short")
        self.pos += n

    def drain(self) -> int:
        left = max(0, self._end - self.pos)
        self.pos = self._end
        return left


def _norm(name: bytes) -> str:
    text = name.decode("utf-8", "surrogateescape")
    return posixpath.normpath("/" + text).lstrip("/")


class ArchiveSource(Source):
    def __init__(self, ref: ArchiveRef) -> None:
        self.ref = ref
        self.label = str(ref)
        try:
            self._file = open(ref.path, "rb")  # noqa: SIM115 - closed by close()
        except OSError as e:
            raise NotFoundError(f"{self.label}: cannot open {ref.path}: {e.strerror}") from None
        try:
            self._members = self._index()
        except BaseException:
            self._file.close()
            raise

    def close(self) -> None:
        self._file.close()

    def _index(self) -> dict[str, _Member]:
        reader = _FileReader(self._file)
        tar = TarReader(reader, self.label)
        members: dict[str, _Member] = {}
        while (e := tar.next()) is not None:
            if e.type in (REG, SYMLINK, LINK):
                link = e.linkname.decode("utf-8", "surrogateescape")
                members[_norm(e.name)] = _Member(reader.pos, e.size, e.type, link)
        return members

    def _member(self, name: str) -> _Member:
        path = _norm(name.encode("utf-8", "surrogateescape"))
        for _ in range(16):
            m = self._members.get(path)
            if m is None:
                raise NotFoundError(f"{self.label}: no {name!r} in the archive")
            if m.kind == REG:
                return m
            base = posixpath.dirname(path) if m.kind == SYMLINK else ""
            path = posixpath.normpath("/" + posixpath.join(base, m.link)).lstrip("/")
        raise FormatError(f"{self.label}: too many links resolving {name!r}")

    def _read(self, name: str, limit: int) -> bytes:
        m = self._member(name)
        if m.size > limit:
            raise FormatError(f"{self.label}: {name} is larger than {limit} bytes")
        return os.pread(self._file.fileno(), m.size, m.offset)

    def _choose(self, manifest: list[Any]) -> dict[str, Any]:
        want = self.ref.ref
        if want is None:
            if len(manifest) != 1:
                tags = [t for m in manifest for t in (m.get("RepoTags") or [])]
                raise NotFoundError(
                    f"{self.label}: the archive holds {len(manifest)} images (tags: "
                    f"{', '.join(tags) or 'none'}); name one as docker-archive:FILE:NAME:TAG"
                )
            return dict(manifest[0])
        if want.startswith("@"):
            if not want[1:].isdigit() or int(want[1:]) >= len(manifest):
                raise NotFoundError(f"{self.label}: no image number {want[1:]} in the archive")
            return dict(manifest[int(want[1:])])
        try:
            wanted = parse_docker(want)
        except SourceSyntaxError as e:
            raise SourceSyntaxError(f"{self.label}: {e}") from None
        for m in manifest:
            for tag in m.get("RepoTags") or []:
                try:
                    if isinstance(tag, str) and parse_docker(tag) == wanted:
                        return dict(m)
                except OciError:
                    continue
        raise NotFoundError(f"{self.label}: no image tagged {want!r} in the archive")

    def resolve(self, platform: Platform) -> Resolved:
        try:
            manifest = json.loads(self._read("manifest.json", MANIFEST_LIMIT))
        except ValueError as e:
            raise FormatError(f"{self.label}: manifest.json is not valid JSON: {e}") from None
        if not isinstance(manifest, list) or not all(isinstance(m, dict) for m in manifest):
            raise FormatError(f"{self.label}: manifest.json must be a list of objects")
        entry = self._choose(manifest)
        config_name, layer_names = entry.get("Config"), entry.get("Layers")
        if not isinstance(config_name, str) or not isinstance(layer_names, list):
            raise FormatError(f"{self.label}: a manifest.json entry without Config or Layers")
        config_bytes = self._read(config_name, CONFIG_LIMIT)
        config_digest = _named_digest(config_name)
        if config_digest is not None:
            check_bytes(config_bytes, config_digest, f"{self.label}: {config_name}")
        config = parse_config(config_bytes, f"{self.label}: {config_name}")
        if len(config.diff_ids) != len(layer_names):
            raise FormatError(
                f"{self.label}: {len(layer_names)} layers but {len(config.diff_ids)} diff_ids"
            )
        layers = []
        for i, name in enumerate(layer_names):
            if not isinstance(name, str):
                raise FormatError(f"{self.label}: a layer name must be a string")
            m = self._member(name)
            # Only ``blobs/sha256/<hex>`` names a layer by the digest of its bytes (older
            # layouts name it by diff_id or by a layer id); the diff_id is checked in any case.
            digest = _named_digest(name) if name.startswith("blobs/") else None
            layers.append(
                Layer(i, LAYER_MEDIA_TYPE, digest, m.size, config.diff_ids[i], None, True, m)
            )
        return Resolved("image", layers, None, "docker-archive", config_digest, config.platform)

    def open_layer(self, layer: Layer) -> FileSlice:
        m = layer.key
        assert isinstance(m, _Member)
        return FileSlice(self._file, m.offset, m.size)


def _named_digest(name: str) -> Digest | None:
    m = _DIGEST_NAME.fullmatch(name)
    return parse_digest(f"sha256:{m.group(1)}") if m else None
