"""Server-supplied text in error messages: bounded, sanitized, never a credential.

Fetch errors end up in pod events and logs, which many people read. Whatever a server chose to
send (a symlink target, a redirect location in libcurl's message, a reason an image does not
parse) is quoted only through :func:`quote`: printable ASCII, URL user information and query
strings removed, at most a few dozen characters. :func:`redact` then removes the repository's
own credentials from a whole message, in case a hostile server echoed them back.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: Longest quotation of server text kept in a message.
QUOTE_MAX = 80
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@'\"]*@")
_URL_QUERY = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^\s'\"?#]*)[?#][^\s'\"]*")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def quote(text: str | bytes, limit: int = QUOTE_MAX) -> str:
    """``text`` made safe to show: non-printable characters as ``?``, URL credentials and
    query strings dropped, cut to ``limit`` characters (``...`` marks a cut). Quoted with
    ``'`` so that it cannot pass for the driver's own words."""
    s = text.decode("latin-1") if isinstance(text, bytes) else text
    s = s[: limit * 4]  # what follows cannot matter: bound the regex work
    s = _UNPRINTABLE.sub("?", s)
    s = _URL_USERINFO.sub(r"\1", s)
    s = _URL_QUERY.sub(r"\1?...", s)
    if len(s) > limit:
        s = s[: max(0, limit - 3)] + "..."
    return "'" + s.replace("'", '"') + "'"


def redact(message: str, secrets: Iterable[str]) -> str:
    """``message`` with every occurrence of each secret (4 characters or longer) replaced by
    ``***``."""
    for secret in secrets:
        if secret and len(secret) >= 4 and secret in message:
            message = message.replace(secret, "***")
    return message
