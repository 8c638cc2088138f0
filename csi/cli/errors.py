"""Turn the errors our layers raise on purpose into one-line messages for the CLI."""

from __future__ import annotations

import errno


def describe(e: BaseException) -> str | None:
    """A user-facing message for an expected error, or None for a bug (shown as a traceback)."""
    from csi.image.errors import ImageError

    expected: tuple[type[BaseException], ...] = (ImageError,)
    for mod, name in (
        ("csi.repo.errors", "RepoError"),
        ("csi.store.errors", "StoreError"),
        ("csi.fetch.errors", "FetchError"),
        ("csi.oci.errors", "OciError"),
        ("csi.config", "ConfigError"),
    ):
        try:
            module = __import__(mod, fromlist=[name])
            expected += (getattr(module, name),)
        except (ImportError, AttributeError):
            continue
    if isinstance(e, expected):
        return str(e)
    if isinstance(e, FileNotFoundError):
        return f"{e.filename}: no such file or directory"
    if isinstance(e, PermissionError):
        return f"{e.filename}: permission denied (run as root, or check ownership)"
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device holding {e.filename or 'the output'}"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename + ': ' if e.filename else ''}{e.strerror}"
    return None
