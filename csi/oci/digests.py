"""OCI content digests (``sha256:<hex>``, ``sha512:<hex>``): parsing and streaming checks."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from .errors import DigestError, FormatError

_ALGORITHMS = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True, slots=True)
class Digest:
    """A parsed digest; ``str()`` gives it back as ``alg:hex``."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)


def parse_digest(text: object, what: str = "digest") -> Digest:
    """``sha256:<64 hex>`` or ``sha512:<128 hex>`` (lower case), else :class:`FormatError`."""
    if not isinstance(text, str):
        raise FormatError(f"{what}: expected a digest string, got {type(text).__name__}")
    alg, sep, hx = text.partition(":")
    want = _ALGORITHMS.get(alg)
    if not sep or want is None:
        raise FormatError(f"{what}: unsupported or malformed digest {text[:100]!r}")
    if len(hx) != want or not _HEX.fullmatch(hx):
        raise FormatError(f"{what}: malformed digest {text[:100]!r}")
    return Digest(alg, hx)


def digest_of(data: bytes, algorithm: str = "sha256") -> Digest:
    return Digest(algorithm, hashlib.new(algorithm, data).hexdigest())


def check_bytes(data: bytes, expected: Digest, what: str, size: int | None = None) -> None:
    """Raise :class:`DigestError` unless ``data`` has ``expected`` digest (and ``size``)."""
    if size is not None and len(data) != size:
        raise DigestError(f"{what}: {len(data)} bytes, but its descriptor says {size}")
    actual = hashlib.new(expected.algorithm, data).hexdigest()
    if actual != expected.hex:
        raise DigestError(
            f"{what}: content hashes to {expected.algorithm}:{actual}, not {expected}"
        )
