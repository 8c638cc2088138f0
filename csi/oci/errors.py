"""Exceptions raised by :mod:`csi.oci`: every one is an expected failure with a message fit for
a user (no credentials in it)."""

from __future__ import annotations


class OciError(Exception):
    """Base class of every error raised on purpose by :mod:`csi.oci`."""


class SourceSyntaxError(OciError):
    """A SOURCE argument is not in a transport syntax we understand."""


class RegistryError(OciError):
    """Talking to a registry failed (connection, TLS, an unexpected HTTP answer)."""


class AuthError(RegistryError):
    """The registry refused our credentials, or wants credentials we do not have."""


class NotFoundError(OciError):
    """The manifest, tag, blob or image asked for does not exist in the source."""


class PlatformError(OciError):
    """An image index has no manifest for the platform asked for."""


class DigestError(OciError):
    """Content does not match the digest (or size) that names it."""


class FormatError(OciError):
    """A manifest, index, config or archive index is malformed or of an unsupported kind."""


class LayerError(OciError):
    """A layer cannot be applied: malformed tar, unsafe names, impossible entries."""
