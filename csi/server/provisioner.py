"""The controller's work: CreateVolume, DeleteVolume, ValidateVolumeCapabilities as plain
methods.

CreateVolume resolves the StorageClass's refs to digests (pinning them), checks every image
exists in the repository (by fetching it, metadata only, into the controller's cache), sets the
capacity to the images' logical size, and encodes the result in the volume id
(:mod:`csi.server.volumeid`). Idempotency: the same name with the same parameters and a
compatible capacity gives back the same volume (without resolving refs again); the same name
with anything else is ALREADY_EXISTS. Names are remembered in memory, and in SQLite when a
state path is given.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc

from csi.sqlite import open_database

from . import attributes as a
from . import volumeid
from .errors import CsiError, already_exists, invalid, not_found
from .imageinfo import ImageSize
from .volumeid import PinnedSpec


class ImageCatalog(Protocol):
    def resolve(self, repository: str, ref: str) -> bytes: ...

    def image_size(self, repository: str, image: bytes) -> ImageSize: ...


class AnnotationReader(Protocol):
    def image(self, namespace: str, name: str) -> str: ...


@dataclass(frozen=True, slots=True)
class Provisioned:
    volume_id: str
    capacity: int
    context: dict[str, str]
    parameters_key: str
    required: int
    limit: int


class Provisioner:
    def __init__(
        self,
        *,
        catalog: ImageCatalog,
        repositories: Sequence[str],
        default_repository: str,
        annotations: AnnotationReader | None = None,
        state_path: Path | None = None,
    ) -> None:
        self.catalog = catalog
        self.repositories = frozenset(repositories)
        self.default_repository = default_repository
        self.annotations = annotations
        self._mu = threading.Lock()
        self._names: dict[str, Provisioned] = {}
        self._db: sqlite3.Connection | None = None
        if state_path is not None:
            state_path.parent.mkdir(parents=True, exist_ok=True)
            self._db = open_database(
                state_path,
                setup=lambda c: c.execute(
                    "CREATE TABLE IF NOT EXISTS volumes "
                    "(name TEXT PRIMARY KEY, record TEXT NOT NULL)"
                ),
            )
            for name, record in self._db.execute("SELECT name, record FROM volumes"):
                self._names[name] = Provisioned(**json.loads(record))

    def _remember(self, name: str, p: Provisioned) -> None:
        self._names[name] = p
        if self._db is not None:
            self._db.execute(
                "INSERT OR REPLACE INTO volumes VALUES (?, ?)",
                (name, json.dumps(_as_dict(p))),
            )

    def _forget(self, volume_id: str) -> None:
        for name in [n for n, p in self._names.items() if p.volume_id == volume_id]:
            del self._names[name]
            if self._db is not None:
                self._db.execute("DELETE FROM volumes WHERE name = ?", (name,))

    def create(
        self, name: str, parameters: Mapping[str, str], required: int, limit: int
    ) -> Provisioned:
        if required < 0 or limit < 0:
            raise invalid("capacity_range: negative sizes")
        if limit and required > limit:
            raise invalid("capacity_range: required_bytes above limit_bytes")
        key = json.dumps(dict(sorted(parameters.items())))
        with self._mu:
            prev = self._names.get(name)
        if prev is not None:
            if prev.parameters_key != key:
                raise already_exists(f"volume {name!r} already exists with different parameters")
            if prev.capacity < required or (limit and prev.capacity > limit):
                raise already_exists(
                    f"volume {name!r} already exists with capacity {prev.capacity}, "
                    f"incompatible with the requested range"
                )
            return prev
        req = a.parse_parameters(parameters)
        refs = req.refs
        if req.from_pvc_annotation:
            if self.annotations is None:
                raise CsiError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "imageFromPVCAnnotation is set but this controller has no Kubernetes API "
                    "access configured",
                )
            ref = self.annotations.image(req.pvc_namespace, req.pvc_name)
            refs = a.parse_refs({a.IMAGE: ref}, "PVC annotation")
        repo = req.repository or self.default_repository
        if repo not in self.repositories:
            raise invalid(f"parameters: repository {repo[:128]!r} is not configured")
        images = tuple(self.catalog.resolve(repo, r) for r in refs)
        size = ImageSize(0, 0)
        for d in images:
            size = size + self.catalog.image_size(repo, d)
        if limit and size.bytes > limit:
            raise CsiError(
                grpc.StatusCode.OUT_OF_RANGE,
                f"the image is {size.bytes} bytes, above capacity_range.limit_bytes {limit}",
            )
        spec = PinnedSpec(repository=repo, images=images, lazy=req.lazy)
        prov = Provisioned(
            volume_id=volumeid.encode(name, spec),
            capacity=max(size.bytes, required),
            context=spec.context(),
            parameters_key=key,
            required=required,
            limit=limit,
        )
        with self._mu:
            prev = self._names.get(name)
            if prev is not None:  # a concurrent create of the same name won
                if prev.parameters_key != key:
                    raise already_exists(f"volume {name!r} already exists")
                return prev
            self._remember(name, prov)
        return prov

    def delete(self, volume_id: str) -> None:
        with self._mu:
            self._forget(volume_id)

    def spec(self, volume_id: str, context: Mapping[str, str]) -> PinnedSpec:
        try:
            return volumeid.decode(volume_id, context)
        except ValueError as e:
            raise not_found(f"volume {volume_id[:200]!r} does not exist: {e}") from None


def _as_dict(p: Provisioned) -> dict[str, object]:
    return {
        "volume_id": p.volume_id,
        "capacity": p.capacity,
        "context": p.context,
        "parameters_key": p.parameters_key,
        "required": p.required,
        "limit": p.limit,
    }
