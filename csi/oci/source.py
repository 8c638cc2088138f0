"""What every source gives the importer: the resolved image (or artifact) and its layer blobs.

:class:`ManifestSource` holds what registries and OCI layouts share: the manifest at the
reference, an index resolved to the platform's manifest (nested indexes too), the config
checked against its descriptor, the diff_ids matched with the layers.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from .digests import Digest
from .errors import FormatError
from .manifest import (
    CONFIG_LIMIT,
    Descriptor,
    Index,
    Manifest,
    Platform,
    is_tar_layer,
    parse_config,
    parse_manifest,
)
from .platform import select
from .streams import RawReader

MAX_INDEX_DEPTH = 4


@dataclass
class Layer:
    index: int
    media_type: str
    #: Digest of the blob as stored; None when the source does not name it (docker-archive).
    digest: Digest | None
    size: int
    #: Images: the diff_id from the config (the digest of the uncompressed tar).
    diff_id: Digest | None
    #: Artifacts: ``org.opencontainers.image.title``.
    title: str | None
    #: Whether the blob is a tar archive (images: always; artifacts: by media type).
    is_tar: bool
    #: Source-specific locator.
    key: object = None


@dataclass
class Resolved:
    #: "image" or "artifact".
    kind: str
    layers: list[Layer]
    manifest_digest: Digest | None
    media_type: str
    config_digest: Digest | None
    #: The platform of the image (from the index entry chosen, else from the config).
    platform: Platform | None
    artifact_type: str = ""


class Source(abc.ABC):
    #: The source as the user would write it again (no credentials).
    label: str

    @abc.abstractmethod
    def resolve(self, platform: Platform) -> Resolved: ...

    @abc.abstractmethod
    def open_layer(self, layer: Layer) -> RawReader: ...

    def close(self) -> None:  # noqa: B027 - optional for subclasses
        pass


class ManifestSource(Source):
    """A source addressed by manifests and blobs (registry, OCI layout)."""

    @abc.abstractmethod
    def top(self) -> tuple[bytes, str, Digest]:
        """The manifest or index the reference names: (bytes, content type, digest), checked."""

    @abc.abstractmethod
    def manifest(self, desc: Descriptor) -> tuple[bytes, str]:
        """The manifest ``desc`` describes, checked against it: (bytes, content type)."""

    @abc.abstractmethod
    def blob(self, desc: Descriptor, limit: int) -> bytes:
        """A small blob, checked against ``desc`` (refused above ``limit`` bytes)."""

    @abc.abstractmethod
    def open_blob(self, desc: Descriptor) -> RawReader: ...

    def open_layer(self, layer: Layer) -> RawReader:
        assert isinstance(layer.key, Descriptor)
        return self.open_blob(layer.key)

    def resolve(self, platform: Platform) -> Resolved:
        what = self.label
        data, content_type, digest = self.top()
        doc = parse_manifest(data, content_type, f"{what}: manifest")
        chosen: Platform | None = None
        depth = 0
        while isinstance(doc, Index):
            depth += 1
            if depth > MAX_INDEX_DEPTH:
                raise FormatError(f"{what}: indexes nested more than {MAX_INDEX_DEPTH} deep")
            desc = select(doc, platform, what)
            chosen = desc.platform or chosen
            data, content_type = self.manifest(desc)
            digest = desc.digest
            doc = parse_manifest(data, content_type or desc.media_type, f"{what}: {digest}")
        return self._resolved(doc, digest, chosen)

    def _resolved(self, m: Manifest, digest: Digest, chosen: Platform | None) -> Resolved:
        what = f"{self.label}: manifest {digest}"
        if not m.is_image:
            layers = [
                Layer(i, d.media_type, d.digest, d.size, None, d.title, is_tar_layer(d.media_type))
                for i, d in enumerate(m.layers)
            ]
            for layer, d in zip(layers, m.layers, strict=True):
                layer.key = d
            return Resolved(
                "artifact",
                layers,
                digest,
                m.media_type,
                m.config.digest,
                chosen,
                m.artifact_type or m.config.media_type,
            )
        config = parse_config(self.blob(m.config, CONFIG_LIMIT), f"{what}: config")
        if len(config.diff_ids) != len(m.layers):
            raise FormatError(
                f"{what}: {len(m.layers)} layers but {len(config.diff_ids)} diff_ids in the config"
            )
        layers = [
            Layer(i, d.media_type, d.digest, d.size, config.diff_ids[i], None, True, d)
            for i, d in enumerate(m.layers)
        ]
        return Resolved(
            "image", layers, digest, m.media_type, m.config.digest, chosen or config.platform
        )
