"""Repository layout (BRIEF §2.1): ``objects/``, ``images/``, ``images/refs/``, ``meta.json``."""

from .errors import (
    DigestMismatch,
    InvalidDigest,
    InvalidRefName,
    ReadOnlyRepository,
    RefNotFound,
    RepoError,
    UnsupportedRepository,
)
from .layout import parse_hex_digest, validate_ref_name
from .repository import Repository, VerifyReport, default_meta

__all__ = [
    "DigestMismatch",
    "InvalidDigest",
    "InvalidRefName",
    "ReadOnlyRepository",
    "RefNotFound",
    "RepoError",
    "Repository",
    "UnsupportedRepository",
    "VerifyReport",
    "default_meta",
    "parse_hex_digest",
    "validate_ref_name",
]
