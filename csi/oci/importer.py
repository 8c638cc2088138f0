"""``composefs-csi import``: an OCI image or artifact into composefs images of a repository.

The source is resolved (platform, manifest, config), then each layer blob is streamed once:
raw bytes hashed against the layer digest, decompressed and hashed against the diff_id, tar
entries applied to the tree (:mod:`csi.oci.apply`) with file contents going straight into
objects (:mod:`csi.oci.objects`). Only when every layer has been read and every digest
checked are the objects published, then the image(s), the provenance record and the refs. On
any failure every temp file is removed: the repository is as it was.

Images from the same source (same manifest, same platform) are byte-identical however often
they are imported: nothing about the import itself (time, host) goes into them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from csi.image.fsverity import digest_bytes
from csi.image.writer import write_image
from csi.repo import Repository, validate_ref_name
from csi.repo import provenance as prov
from csi.repo.packs import PackOptions, PackReport, pack_tree
from csi.repo.refdeltas import choose_bases, write_pointer, write_ref_deltas

from .apply import WHITEOUT_PREFIX, Applier, finish_tree
from .archive import ArchiveSource
from .auth import load_credentials
from .delta import layer_tree
from .errors import DigestError, LayerError, OciError
from .httpclient import HttpClient, HttpOptions
from .layout import LayoutSource
from .manifest import Platform
from .objects import ObjectSink
from .platform import host_platform
from .prefetch import Prefetcher
from .reference import ArchiveRef, DockerRef, LayoutRef, parse_source
from .registry import RegistryClient, RegistrySource
from .source import Layer, Resolved, Source
from .streams import CHUNK, ByteReader, CheckedBlob, Decompressed
from .tarstream import TarReader
from .unpack import add_file, apply_tar

log = logging.getLogger(__name__)

#: ``progress(bytes read, total bytes, what)``.
Progress = Callable[[int, int, str], None]


@dataclass
class ImportOptions:
    platform: Platform | None = None
    #: One image per layer (overlay whiteouts) instead of one flattened image.
    layers: bool = False
    refs: list[str] = field(default_factory=list)
    creds_file: str | None = None
    authfile: str | None = None
    ca_bundle: str | None = None
    plain_http: bool = False
    timeout: float = 60.0
    #: Also write each image's small objects into packs (``--pack``), before the image is
    #: linked; None: no packs.
    pack: PackOptions | None = None


@dataclass
class ImportResult:
    source: str
    kind: str
    manifest_digest: str | None
    config_digest: str | None
    platform: str | None
    #: Image digests made (one; or one per layer, lowest first, with ``layers``).
    images: list[bytes]
    refs: list[str]
    layer_count: int
    files: int
    file_bytes: int
    new_objects: int
    new_bytes: int
    present_objects: int
    #: What was packed for each image (with ``ImportOptions.pack``).
    packs: list[PackReport] = field(default_factory=list)


def open_source(text: str, options: ImportOptions) -> Source:
    ref = parse_source(text)
    if isinstance(ref, DockerRef):
        http = HttpClient(
            HttpOptions(
                ca_bundle=options.ca_bundle,
                allow_plain_http=options.plain_http,
                timeout=options.timeout,
            )
        )
        creds = load_credentials(ref.registry, options.creds_file, options.authfile)
        client = RegistryClient(ref, http, creds, plain_http=options.plain_http)
        return RegistrySource(client)
    if isinstance(ref, LayoutRef):
        return LayoutSource(ref)
    assert isinstance(ref, ArchiveRef)
    return ArchiveSource(ref)


def layer_refs(names: list[str], count: int) -> list[list[str]]:
    """The refs of each layer image with ``--layers``: ``NAME-layerN`` (N from 0, lowest)."""
    return [[f"{name}-layer{i}" for name in names] for i in range(count)]


class _Run:
    def __init__(
        self,
        source: Source,
        resolved: Resolved,
        sink: ObjectSink,
        options: ImportOptions,
        progress: Progress | None,
    ) -> None:
        self.source = source
        self.resolved = resolved
        self.sink = sink
        self.options = options
        self.progress = progress
        self.total = sum(layer.size for layer in resolved.layers)
        self.done = 0
        self.applier = Applier(overlay_private_xattrs=options.layers)
        self.titles: set[bytes] = set()

    def _on_bytes(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total, "")

    def layer(self, layer: Layer) -> None:
        n = len(self.resolved.layers)
        what = f"{self.source.label}: layer {layer.index + 1}/{n} ({layer.digest or 'no digest'})"
        if self.progress is not None:
            self.progress(self.done, self.total, f"layer {layer.index + 1}/{n}")
        raw = self.source.open_layer(layer)
        try:
            blob = CheckedBlob(raw, layer.digest, layer.size, what, self._on_bytes)
            dec: Decompressed | None = None
            try:
                if layer.is_tar:
                    dec = Decompressed(blob, what)
                    with Prefetcher(dec) as ahead:
                        reader = ByteReader(ahead)
                        tar = TarReader(reader, what)
                        apply_tar(
                            tar, self.applier, self.sink, what, layers_mode=self.options.layers
                        )
                        reader.drain()  # bytes after the archive's end count for the diff_id
                else:
                    with Prefetcher(lambda: blob.read(CHUNK)) as ahead:
                        self._plain_file(layer, ByteReader(ahead), what)
            except LayerError as e:
                # A corrupt blob explains a malformed stream better than the stream does.
                if layer.digest is not None:
                    try:
                        blob.finish()
                    except DigestError as d:
                        raise d from e
                raise
            blob.finish()
            if dec is not None:
                dec.check_diff_id(layer.diff_id, what)
        finally:
            raw.close()

    def _plain_file(self, layer: Layer, reader: ByteReader, what: str) -> None:
        if layer.title:
            path = layer.title.encode("utf-8", "surrogateescape")
            if any(p.startswith(WHITEOUT_PREFIX) for p in path.split(b"/")):
                raise LayerError(f"{what}: the title {layer.title!r} is a whiteout name")
        else:
            assert layer.digest is not None
            path = f"blobs/{layer.digest.algorithm}/{layer.digest.hex}".encode()
        if path.strip(b"/") in self.titles:
            raise LayerError(f"{what}: two layers are titled {layer.title!r}")
        self.titles.add(path.strip(b"/"))
        add_file(reader, layer.size, path, self.applier, self.sink, what)


def run_import(
    text: str, repo: Repository, options: ImportOptions, progress: Progress | None = None
) -> ImportResult:
    """Import ``text`` (a SOURCE) into ``repo``; see the module doc."""
    for name in options.refs:
        validate_ref_name(name)
        validate_ref_name(f"{name}-layer0")
    source = open_source(text, options)
    try:
        resolved = source.resolve(options.platform or host_platform())
        if options.layers and resolved.kind != "image":
            raise OciError(f"{source.label}: --layers applies to container images, not artifacts")
        sink = ObjectSink(repo)
        try:
            run = _Run(source, resolved, sink, options, progress)
            trees = []
            for layer in resolved.layers:
                run.applier.begin_layer()
                run.layer(layer)
                if options.layers:
                    trees.append(layer_tree(run.applier.root, run.applier.changes))
            if not options.layers:
                trees = [finish_tree(run.applier.root)]
            images = [write_image(t) for t in trees]
            sink.commit()
        except BaseException:
            sink.abort()
            raise
        packs = []
        if options.pack is not None:
            # Before the images are linked: a client that sees an image may look for its
            # index at once.
            packs = [
                pack_tree(repo, digest_bytes(img), tree, options.pack)
                for tree, img in zip(trees, images, strict=True)
            ]
        digests = [repo.add_image(img) for img in images]
        result = ImportResult(
            source=source.label,
            kind=resolved.kind,
            manifest_digest=str(resolved.manifest_digest) if resolved.manifest_digest else None,
            config_digest=str(resolved.config_digest) if resolved.config_digest else None,
            platform=str(resolved.platform) if resolved.platform else None,
            images=digests,
            refs=[],
            layer_count=len(resolved.layers),
            files=sink.files,
            file_bytes=sink.bytes,
            new_objects=sink.new_objects,
            new_bytes=sink.new_bytes,
            present_objects=sink.present_objects,
            packs=packs,
        )
        _publish(repo, result, resolved, options)
        return result
    finally:
        source.close()


def _publish(
    repo: Repository, result: ImportResult, resolved: Resolved, options: ImportOptions
) -> None:
    """Provenance of each image made, then the refs (last: a ref names a complete image)."""
    base: dict[str, Any] = {
        "source": result.source,
        "kind": result.kind,
        "manifest_digest": result.manifest_digest,
        "config_digest": result.config_digest,
        "media_type": resolved.media_type,
        "platform": result.platform,
        "layers": [str(layer.digest) if layer.digest else None for layer in resolved.layers],
        "diff_ids": [str(layer.diff_id) if layer.diff_id else None for layer in resolved.layers],
    }
    if resolved.artifact_type:
        base["artifact_type"] = resolved.artifact_type
    records = []
    for i, digest in enumerate(result.images):
        record = dict(base)
        if options.layers:
            record["layer_index"] = i
        records.append(record)
        prov.record_image(repo, digest, record)
    if options.layers:
        names_per_image = layer_refs(options.refs, len(result.images))
    else:
        names_per_image = [list(options.refs)]
    for digest, record, names in zip(result.images, records, names_per_image, strict=True):
        for name in names:
            prov.record_ref(repo, name, digest, record)  # first: a reader of the ref finds it
            if options.pack is None:
                repo.set_ref(name, digest)
            else:  # deltas first, then the ref, then its pointer (csi.repo.refdeltas)
                write_ref_deltas(repo, digest, choose_bases(repo, name, digest))
                repo.set_ref(name, digest)
                write_pointer(repo, name, digest)
            result.refs.append(name)
