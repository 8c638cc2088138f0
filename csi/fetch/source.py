"""One mirror of a repository: the interface every kind of mirror implements.

A :class:`Source` reads one repository-relative path (``objects/XX/...``, ``images/<hex>``,
``images/refs/<name>``) and streams the body to a callback. With ``accept_symlink`` a symlink is
not followed: its target text comes back instead (a local symlink, or an HTTP answer with
``Content-Type: text/x-symlink-target``). Each call is one attempt: failures raise a
:class:`~csi.fetch.errors.SourceError` that says whether a retry makes sense.

Implementations: :class:`csi.fetch.files.FileSource` (a directory) and
:class:`csi.fetch.http.HttpSource` (HTTP(S)); :func:`csi.fetch.sources.make_source` picks one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

SYMLINK_CONTENT_TYPE = "text/x-symlink-target"
#: Longest symlink target text accepted.
SYMLINK_MAX = 4096
CHUNK = 1 << 20

OnData = Callable[[bytes], object]


@dataclass(frozen=True, slots=True)
class Validators:
    """What identifies one version of an HTTP answer (``ETag``, ``Last-Modified``): sent back
    with a conditional request, whose 304 answer then says that nothing changed."""

    etag: str | None = None
    last_modified: str | None = None

    def __bool__(self) -> bool:
        return bool(self.etag or self.last_modified)


@dataclass(frozen=True, slots=True)
class Response:
    """What a successful :meth:`Source.get` returns: ``symlink_target`` is set (and no data was
    passed on) when the path was a symlink and ``accept_symlink`` was asked for.
    ``validators``: of an ``accept_symlink`` answer over HTTP, when the server gave any.
    ``not_modified``: a conditional request was answered 304 (no data was passed on)."""

    size: int
    symlink_target: str | None = None
    validators: Validators | None = None
    not_modified: bool = False


class Source(ABC):
    """One mirror. ``label`` is safe to show (scheme, host and port, or the local path);
    ``identity`` tells mirrors apart (the whole base URL or path; never a credential, which
    a configured URL cannot hold)."""

    label: str
    identity: str

    @abstractmethod
    def get(
        self,
        relpath: str,
        on_data: OnData,
        *,
        accept_symlink: bool = False,
        max_size: int | None = None,
        span: tuple[int, int] | None = None,
        validators: Validators | None = None,
    ) -> Response:
        """Stream ``relpath`` to ``on_data``. Exceptions raised by ``on_data`` propagate as is.

        ``span`` (offset, length): only those bytes of the file (a Range request over
        HTTP); fewer than ``length`` is an error (not a short response). ``validators``
        (with ``accept_symlink``): a conditional request; sources that cannot make one
        ignore them."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
