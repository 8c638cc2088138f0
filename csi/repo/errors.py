"""Exceptions raised by :mod:`csi.repo`."""

from __future__ import annotations


class RepoError(Exception):
    """Base class of every error raised by :mod:`csi.repo`."""


class UnsupportedRepository(RepoError):
    """The directory is a repository this code cannot use (algorithm, version, features)."""


class ReadOnlyRepository(RepoError):
    """A write was attempted on a repository opened read-only (unknown ro-compat features)."""


class InvalidRefName(RepoError):
    """A ref name is not acceptable (empty, ``..``, absolute, unprintable, too long)."""


class RefNotFound(RepoError):
    """No ref of that name exists in the repository."""


class InvalidDigest(RepoError):
    """A string or byte value is not a SHA-256 fs-verity digest."""


class DigestMismatch(RepoError):
    """Content does not hash to the digest it was supposed to have.

    ``expected`` and ``actual`` are the raw 32-byte digests.
    """

    def __init__(self, expected: bytes, actual: bytes, what: str = "content") -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"{what}: fs-verity digest mismatch: expected {expected.hex()}, got {actual.hex()}"
        )
