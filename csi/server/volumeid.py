"""Volume ids of provisioned (persistent) volumes: everything the node needs, in the id.

CreateVolume pins the StorageClass's refs to digests; the id then says which repository, which
images (lowest layer first) and which fetch mode, so a node can serve the volume from the id
alone and every id is validated before use::

    cfs1:<tag>:<mode>:<repository>:<image>[+<image>...]

``tag`` is 8 base32 characters of SHA-256 of the CreateVolume ``name`` (so two PVCs never share a
volume id, which kubelet would treat as one volume); ``mode`` is ``e`` (eager) or ``l`` (lazy);
each image is its 32-byte digest in unpadded base64url (43 characters). With one image and a
short repository name that is about 70 bytes, within the spec's 128-byte limit for strings.
When the compact form would exceed 128 bytes (many layers, long names) or the repository name
holds characters outside ``[A-Za-z0-9._-]``, the id is::

    cfs1h:<tag>:<43 base64url of SHA-256 of the canonical spec>

and the spec travels in ``volume_context`` (which the CO passes to every node call); the node
recomputes the hash and refuses a context that does not match.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from csi.fetch.refs import parse_digest

from . import attributes as a
from .errors import invalid

PREFIX = "cfs1"
HASHED_PREFIX = "cfs1h"
MAX_ID = 128
_REPO_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_B64 = re.compile(r"[A-Za-z0-9_-]{43}")
_TAG = re.compile(r"[a-z2-7]{8}")


@dataclass(frozen=True, slots=True)
class PinnedSpec:
    """A volume with its refs resolved: images (lowest first) in ``repository``."""

    repository: str
    images: tuple[bytes, ...]
    lazy: bool = False

    def context(self) -> dict[str, str]:
        """The ``volume_context`` describing this spec (digests as ``sha256:<hex>``)."""
        spec = a.VolumeSpec(
            refs=tuple("sha256:" + d.hex() for d in self.images),
            repository=self.repository,
            lazy=self.lazy,
        )
        return a.spec_context(spec, self.repository)

    def canonical(self) -> bytes:
        return json.dumps(
            {"r": self.repository, "l": self.lazy, "i": [d.hex() for d in self.images]},
            sort_keys=True,
            separators=(",", ":"),
        ).encode()


def _b64(d: bytes) -> str:
    return base64.urlsafe_b64encode(d).rstrip(b"=").decode()


def _unb64(s: str) -> bytes:
    if not _B64.fullmatch(s):
        raise ValueError("not 43 base64url characters")
    return base64.urlsafe_b64decode(s + "=")


def name_tag(name: str) -> str:
    return base64.b32encode(hashlib.sha256(name.encode()).digest()[:5]).decode().lower()


def encode(name: str, spec: PinnedSpec) -> str:
    if not spec.images:
        raise ValueError("a volume needs at least one image")
    tag = name_tag(name)
    mode = "l" if spec.lazy else "e"
    if _REPO_RE.fullmatch(spec.repository):
        vid = f"{PREFIX}:{tag}:{mode}:{spec.repository}:" + "+".join(_b64(d) for d in spec.images)
        if len(vid) <= MAX_ID:
            return vid
    return f"{HASHED_PREFIX}:{tag}:{_b64(hashlib.sha256(spec.canonical()).digest())}"


def is_ours(volume_id: str) -> bool:
    return volume_id.startswith((PREFIX + ":", HASHED_PREFIX + ":"))


def decode(volume_id: str, context: Mapping[str, str] | None = None) -> PinnedSpec:
    """The spec of one of our volume ids; ValueError (with the reason) for anything else."""
    parts = volume_id.split(":")
    if parts[0] == PREFIX and len(parts) == 5:
        _, tag, mode, repo, images = parts
        if not _TAG.fullmatch(tag) or mode not in ("e", "l") or not _REPO_RE.fullmatch(repo):
            raise ValueError("malformed volume id")
        digests = tuple(_unb64(p) for p in images.split("+"))
        if len(digests) > a.MAX_LAYERS:
            raise ValueError("too many images")
        return PinnedSpec(repository=repo, images=digests, lazy=mode == "l")
    if parts[0] == HASHED_PREFIX and len(parts) == 3:
        _, tag, want = parts
        if not _TAG.fullmatch(tag):
            raise ValueError("malformed volume id")
        expected = _unb64(want)
        if not context:
            raise ValueError("this volume id needs its volume_context")
        spec = pinned_from_context(context)
        if hashlib.sha256(spec.canonical()).digest() != expected:
            raise ValueError("volume_context does not match the volume id")
        return spec
    raise ValueError("not a composefs-csi volume id")


def pinned_from_context(context: Mapping[str, str]) -> PinnedSpec:
    """A spec whose refs are all digests and whose repository is named (CreateVolume's
    context); raises CsiError INVALID_ARGUMENT otherwise."""
    spec = a.parse_volume_attributes(context)
    if spec.repository is None:
        raise invalid("volume_context: 'repository' missing")
    images = []
    for ref in spec.refs:
        d = parse_digest(ref)
        if d is None:
            raise invalid(f"volume_context: {ref[:80]!r} is not pinned to a digest")
        images.append(d)
    return PinnedSpec(repository=spec.repository, images=tuple(images), lazy=spec.lazy)
