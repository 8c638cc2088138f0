"""Exceptions raised by :mod:`csi.store`."""

from __future__ import annotations

from csi.repo.errors import DigestMismatch, RepoError

__all__ = ["DigestMismatch", "ImageRejected", "StoreError", "StoreFull"]


class StoreError(RepoError):
    """Base class of the store's own errors."""


class StoreFull(StoreError):
    """No space left for an object even after garbage collection."""


class ImageRejected(StoreError):
    """Image bytes that match their digest but do not parse as a composefs image."""
