"""The per-node content store (BRIEF §2.3): a repository plus SQLite state and a temp area."""

from .admin import fsck_store, gc_store
from .errors import DigestMismatch, ImageRejected, StoreError, StoreFull
from .refs import RefRecord
from .reports import FsckReport, GcReport, RecoveryReport, StoreUsage
from .store import Fill, ImageParser, Kind, Store, default_image_parser
from .writer import ObjectWriter, is_no_space

__all__ = [
    "DigestMismatch",
    "Fill",
    "FsckReport",
    "GcReport",
    "ImageParser",
    "ImageRejected",
    "Kind",
    "ObjectWriter",
    "RecoveryReport",
    "RefRecord",
    "Store",
    "StoreError",
    "StoreFull",
    "StoreUsage",
    "default_image_parser",
    "fsck_store",
    "gc_store",
    "is_no_space",
]
