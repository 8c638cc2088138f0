"""A mirror that is a repository directory on a local (or network-mounted) filesystem."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from csi.repo.beneath import open_beneath, readlink_beneath

from .errors import (
    SourceBadResponse,
    SourceDenied,
    SourceError,
    SourceInvalid,
    SourceNotFound,
    SourceTransient,
)
from .source import CHUNK, OnData, Response, Source, Validators


class FileSource(Source):
    """A repository directory on a local (or network-mounted) filesystem.

    Nothing outside the directory is ever read: paths are resolved beneath it
    (:func:`csi.repo.beneath.open_beneath`), so a symlink inside the repository that points
    elsewhere (``images/refs/ns -> /etc``) is an error, not a way to read the node's files.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.label = self.identity = str(root)

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
        try:
            root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise _os_error(e, ".") from None
        try:
            if accept_symlink:
                try:
                    target = readlink_beneath(root_fd, relpath)
                except OSError as e:
                    if e.errno != errno.EINVAL:  # EINVAL: not a symlink, read it below
                        raise
                else:
                    return Response(len(target), target)
            fd = open_beneath(root_fd, relpath, os.O_RDONLY)
        except OSError as e:
            raise _os_error(e, relpath) from None
        finally:
            os.close(root_fd)
        total = 0
        left = -1
        if span is not None:
            max_size, left = span[1], span[1]
        try:
            with os.fdopen(fd, "rb", buffering=0) as f:
                if span is not None:
                    try:
                        f.seek(span[0])
                    except OSError as e:
                        raise _os_error(e, relpath) from None
                while left:
                    try:
                        chunk = f.read(CHUNK if left < 0 else min(CHUNK, left))
                    except OSError as e:
                        raise _os_error(e, relpath) from None
                    if not chunk:
                        break
                    left -= len(chunk) if left > 0 else 0
                    total += len(chunk)
                    if max_size is not None and total > max_size:
                        raise SourceBadResponse(f"larger than the {max_size}-byte limit")
                    on_data(chunk)
        except IsADirectoryError:
            raise SourceNotFound("is a directory, not a file") from None
        if left > 0:
            raise SourceBadResponse(f"the file ends {left} bytes before the end of the range")
        return Response(total)


def _os_error(e: OSError, relpath: str) -> SourceError:
    what = e.strerror or e.__class__.__name__
    if e.errno in (errno.EXDEV, errno.ELOOP):
        return SourceInvalid("refused: a symlink on the way leads outside the repository directory")
    if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR):
        return SourceNotFound(f"not found ({what})")
    if e.errno in (errno.EACCES, errno.EPERM):
        return SourceDenied(f"permission denied ({what})")
    return SourceTransient(f"read error ({what})")
