"""Making the :class:`~csi.fetch.source.Source` for a configured mirror URL."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

from .config import RepositoryConfig, display_url
from .files import FileSource
from .http import HttpSource
from .source import SYMLINK_CONTENT_TYPE, OnData, Response, Source


def make_source(url: str, config: RepositoryConfig) -> Source:
    """The source for one configured URL (already checked by :class:`RepositoryConfig`)."""
    if "://" not in url:
        return FileSource(Path(url))
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        return FileSource(Path(urllib.parse.unquote(parts.path)))
    return HttpSource(url, config)


__all__ = [
    "SYMLINK_CONTENT_TYPE",
    "FileSource",
    "HttpSource",
    "OnData",
    "Response",
    "Source",
    "display_url",
    "make_source",
]
