"""Exceptions raised by :mod:`csi.fetch`.

Every public error is a :class:`FetchError`. Its message names the repository (by its configured
name, never a credential), the object, image or ref concerned, and what went wrong; ``code`` is the
gRPC status code name the CSI layer should answer with.

:class:`SourceError` and its subclasses are internal: one failed attempt against one mirror. The
client turns them into public errors once retries and mirrors are exhausted.
"""

from __future__ import annotations


class FetchError(Exception):
    """Base class of every error :mod:`csi.fetch` lets escape."""

    #: gRPC status code name for the CSI layer.
    code = "INTERNAL"

    def __init__(self, message: str, *, repository: str | None = None, subject: str | None = None):
        self.repository = repository
        self.subject = subject
        prefix = ""
        if repository is not None:
            prefix = f"repository {repository!r}: "
        if subject is not None:
            prefix += f"{subject}: "
        super().__init__(prefix + message)


class InvalidReference(FetchError):
    """A reference (digest or ref name) is malformed. Nothing was requested."""

    code = "INVALID_ARGUMENT"


class ConfigError(FetchError):
    """A repository configuration is unusable (bad URL, plain HTTP not allowed, missing file)."""

    code = "FAILED_PRECONDITION"


class NotFound(FetchError):
    """The repository does not have the ref, image or object (on any mirror)."""

    code = "NOT_FOUND"


class AccessDenied(FetchError):
    """The repository refused our credentials (HTTP 401/403, unreadable local file)."""

    code = "PERMISSION_DENIED"


class Unreachable(FetchError):
    """The repository could not be reached or kept failing (connection errors, 5xx, timeouts)."""

    code = "UNAVAILABLE"


class TimedOut(Unreachable):
    """A connect, read or whole-object timeout expired on every attempt."""

    code = "DEADLINE_EXCEEDED"


class Corrupt(FetchError):
    """Every source delivered bytes that do not match their digest, or an image that does not
    parse, or a malformed ref answer. Nothing of it was stored."""

    code = "DATA_LOSS"


class BadResponse(FetchError):
    """The server answered in a way the protocol does not allow (unexpected status, oversize)."""

    code = "UNAVAILABLE"


class NoSpace(FetchError):
    """The store is full even after garbage collection."""

    code = "RESOURCE_EXHAUSTED"


# -- internal: one attempt against one source --------------------------------------------------


class SourceError(Exception):
    """One attempt against one mirror failed. ``transient`` errors are worth retrying."""

    transient = False
    public: type[FetchError] = Unreachable

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SourceTransient(SourceError):
    """Connection error, 5xx, 429, 408: try again later or on another mirror."""

    transient = True


class SourceTimeout(SourceTransient):
    """A timeout expired."""

    public = TimedOut


class SourceNotFound(SourceError):
    """404/410 or no such local file."""

    public = NotFound


class SourceDenied(SourceError):
    """401/403 or permission denied."""

    public = AccessDenied


class SourceBadResponse(SourceError):
    """An answer we do not accept (other 4xx, oversize body, bad ref answer)."""

    public = BadResponse


class SourceCorrupt(SourceTransient):
    """Bytes that do not verify: a failure of this source; another mirror or retry may do."""

    public = Corrupt


class SourceInvalid(SourceError):
    """This source answered with something unusable (an image that does not parse, a malformed
    symlink target): not worth retrying here, another mirror may do better."""

    public = Corrupt
