"""OCI / Docker manifests, indexes and image configs: parsed and checked, never trusted.

Accepted: OCI image manifests and indexes, Docker schema 2 manifests and manifest lists (the
same shapes). Docker schema 1 is refused with a clear message. Sizes are limited before
parsing (:data:`MANIFEST_LIMIT`, :data:`CONFIG_LIMIT`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .digests import Digest, parse_digest
from .errors import FormatError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
IMAGE_CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)
#: What we ask registries for, best first.
ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))
MANIFEST_LIMIT = 4 << 20
CONFIG_LIMIT = 16 << 20
TITLE = "org.opencontainers.image.title"
REF_NAME = "org.opencontainers.image.ref.name"

#: Layer media types that are tar archives (possibly compressed), images and artifacts alike.
_TAR_SUFFIXES = (".tar", "+tar", ".tar+gzip", ".tar+zstd", ".tar.gzip", ".tar.gz", ".tar.zstd")


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(slots=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: Platform | None = None
    artifact_type: str = ""

    @property
    def title(self) -> str | None:
        return self.annotations.get(TITLE)


@dataclass(slots=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: list[Descriptor]
    artifact_type: str = ""

    @property
    def is_image(self) -> bool:
        """A container image (a filesystem in layers), not some other artifact."""
        return (
            not self.artifact_type
            and self.config.media_type in IMAGE_CONFIG_TYPES
            and all(is_tar_layer(d.media_type) for d in self.layers)
        )


@dataclass(slots=True)
class Index:
    media_type: str
    manifests: list[Descriptor]


@dataclass(slots=True)
class ImageConfig:
    diff_ids: list[Digest]
    platform: Platform


def is_tar_layer(media_type: str) -> bool:
    mt = media_type.lower()
    return mt.startswith("application/vnd.docker.image.rootfs.") or mt.endswith(_TAR_SUFFIXES)


def _json(data: bytes, what: str, limit: int) -> dict[str, Any]:
    if len(data) > limit:
        raise FormatError(f"{what}: {len(data)} bytes, more than the {limit}-byte limit")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{what}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{what}: expected a JSON object")
    return doc


def _str(doc: dict[str, Any], key: str, what: str, default: str | None = None) -> str:
    v = doc.get(key, default)
    if not isinstance(v, str):
        raise FormatError(f"{what}: '{key}' must be a string")
    return v


def _annotations(doc: dict[str, Any], what: str) -> dict[str, str]:
    a = doc.get("annotations") or {}
    if not isinstance(a, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in a.items()
    ):
        raise FormatError(f"{what}: 'annotations' must map strings to strings")
    return a


def _platform(doc: Any, what: str) -> Platform | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise FormatError(f"{what}: 'platform' must be an object")
    return Platform(
        _str(doc, "os", what, ""),
        _str(doc, "architecture", what, ""),
        _str(doc, "variant", what, ""),
    )


def parse_descriptor(doc: Any, what: str) -> Descriptor:
    if not isinstance(doc, dict):
        raise FormatError(f"{what}: a descriptor must be an object")
    size = doc.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise FormatError(f"{what}: descriptor without a valid 'size'")
    return Descriptor(
        media_type=_str(doc, "mediaType", what, ""),
        digest=parse_digest(doc.get("digest"), what),
        size=size,
        annotations=_annotations(doc, what),
        platform=_platform(doc.get("platform"), what),
        artifact_type=_str(doc, "artifactType", what, ""),
    )


def parse_manifest(data: bytes, content_type: str | None, what: str) -> Manifest | Index:
    """A manifest or an index, whichever ``data`` is (its own ``mediaType`` first, then the
    transport's content type, then its shape)."""
    doc = _json(data, what, MANIFEST_LIMIT)
    media_type = doc.get("mediaType") or (content_type or "").split(";")[0].strip()
    if doc.get("schemaVersion") == 1 or media_type in DOCKER_SCHEMA1:
        raise FormatError(
            f"{what}: a Docker schema 1 manifest (deprecated and unsupported: push the image "
            "again with a current tool)"
        )
    if doc.get("schemaVersion") != 2:
        raise FormatError(f"{what}: unsupported schemaVersion {doc.get('schemaVersion')!r}")
    if not isinstance(media_type, str):
        raise FormatError(f"{what}: 'mediaType' must be a string")
    is_index = media_type in INDEX_TYPES or (not media_type and "manifests" in doc)
    if is_index:
        items = doc.get("manifests")
        if not isinstance(items, list):
            raise FormatError(f"{what}: an index without a 'manifests' list")
        return Index(
            media_type or OCI_INDEX,
            [parse_descriptor(m, f"{what}, manifests[{i}]") for i, m in enumerate(items)],
        )
    if media_type and media_type not in MANIFEST_TYPES:
        raise FormatError(f"{what}: unsupported manifest media type {media_type!r}")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise FormatError(f"{what}: a manifest without a 'layers' list")
    return Manifest(
        media_type=media_type or OCI_MANIFEST,
        config=parse_descriptor(doc.get("config"), f"{what}, config"),
        layers=[parse_descriptor(d, f"{what}, layers[{i}]") for i, d in enumerate(layers)],
        artifact_type=_str(doc, "artifactType", what, ""),
    )


def parse_config(data: bytes, what: str) -> ImageConfig:
    doc = _json(data, what, CONFIG_LIMIT)
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise FormatError(f"{what}: 'rootfs' must be an object of type 'layers'")
    ids = rootfs.get("diff_ids")
    if not isinstance(ids, list):
        raise FormatError(f"{what}: 'rootfs.diff_ids' must be a list")
    return ImageConfig(
        diff_ids=[parse_digest(d, f"{what}, diff_ids[{i}]") for i, d in enumerate(ids)],
        platform=Platform(
            _str(doc, "os", what, ""),
            _str(doc, "architecture", what, ""),
            _str(doc, "variant", what, ""),
        ),
    )
