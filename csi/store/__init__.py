"""The per-node content store (BRIEF §2.3): a repository plus SQLite state and a temp area."""

from .admin import fsck_store, gc_store
from .errors import DigestMismatch, ImageRejected, StoreError, StoreFull
from .reports import FsckReport, GcReport, RecoveryReport, StoreUsage
from .store import Fill, ImageParser, Kind, RefRecord, Store, default_image_parser, is_no_space
from .writer import ObjectWriter

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
