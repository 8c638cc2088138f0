"""Repository configuration: where a named repository lives and how to talk to it.

Credentials are never held in these objects: only the paths of the files that contain them, read
at the moment of use. ``repr()`` of every object here is safe to log.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

_SCHEMES = ("https", "http", "file")


@dataclass(frozen=True, slots=True)
class BearerAuth:
    """``Authorization: Bearer <token>``; the token is the stripped content of ``token_file``."""

    token_file: Path

    def token(self) -> str:
        return _read_secret(self.token_file, "bearer token")

    def __repr__(self) -> str:
        return f"BearerAuth(token_file={str(self.token_file)!r})"


@dataclass(frozen=True, slots=True)
class BasicAuth:
    """HTTP basic auth as ``username``; the password is the content of ``password_file``."""

    username: str
    password_file: Path

    def password(self) -> str:
        return _read_secret(self.password_file, "password")

    def __repr__(self) -> str:
        return f"BasicAuth(username={self.username!r}, password_file={str(self.password_file)!r})"


Auth = BearerAuth | BasicAuth


def _read_secret(path: Path, what: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        # Name the file, never its content.
        raise ConfigError(
            f"cannot read the {what} file {str(path)!r}: {e.__class__.__name__}"
        ) from None
    secret = text.strip("\r\n")
    if not secret or "\n" in secret or "\r" in secret:
        raise ConfigError(f"the {what} file {str(path)!r} must hold exactly one non-empty line")
    return secret


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds. ``read``: longest time without receiving a byte. ``total``: one whole object."""

    connect: float = 10.0
    read: float = 30.0
    total: float = 600.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff: attempt n (from 1) waits ``min(max_backoff, base * 2**(n-1))``, then
    a random ``jitter`` fraction of that is taken off (``jitter=1``: full jitter). A Retry-After
    answer replaces the computed wait, capped at ``max_retry_after``."""

    max_attempts: int = 5
    base_backoff: float = 0.2
    max_backoff: float = 10.0
    jitter: float = 0.5
    max_retry_after: float = 60.0


#: Default of :attr:`RepositoryConfig.max_image_size`.
DEFAULT_MAX_IMAGE_SIZE = 256 << 20
#: Default of :attr:`RepositoryConfig.offline_max_staleness`: a week.
DEFAULT_OFFLINE_MAX_STALENESS = 7 * 24 * 3600.0

#: Repository names (pods choose one by name: volumeAttributes.repository): Kubernetes-style.
REPOSITORY_NAME_MAX = 63
_REPOSITORY_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?")


@dataclass(frozen=True, slots=True)
class RepositoryConfig:
    """One admin-configured repository. ``urls``: mirrors, tried in order for each object.

    A URL is ``https://...``, ``http://...`` (only with ``allow_plain_http``), ``file:///...`` or a
    plain local path. URLs must not carry credentials (use ``auth``) or query strings.
    """

    name: str
    urls: tuple[str, ...]
    auth: Auth | None = None
    ca_bundle: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    allow_plain_http: bool = False
    timeouts: Timeouts = field(default_factory=Timeouts)
    retries: RetryPolicy = field(default_factory=RetryPolicy)
    concurrency: int = 16
    #: Worker processes for eager fetches of many objects (csi.fetch.bulk); 0: none, all
    #: downloads in threads of the calling process; None: two per CPU, at most 8 and at
    #: most ``concurrency``.
    processes: int | None = None
    #: Largest image (metadata) accepted, bytes (decompressed, if the server compressed it).
    #: An image takes about 225 bytes per file, directory or link (Debian 12's /usr: 139k
    #: entries, 31 MB), so the default fits trees of about a million entries, and bounds what
    #: a broken or hostile server can make the node hold in memory (about twice this).
    max_image_size: int = DEFAULT_MAX_IMAGE_SIZE
    #: When every mirror is unreachable, a ref this node resolved before resolves to what it
    #: was then (like ``imagePullPolicy: IfNotPresent``), with a warning and a metric; False:
    #: such a ref fails instead ("always current").
    offline_refs: bool = True
    #: ... but only if a mirror confirmed that resolution at most this many seconds ago
    #: (None: however old).
    offline_max_staleness: float | None = DEFAULT_OFFLINE_MAX_STALENESS

    def __post_init__(self) -> None:
        if isinstance(self.urls, str):
            object.__setattr__(self, "urls", (self.urls,))
        else:
            object.__setattr__(self, "urls", tuple(self.urls))
        if not self.name:
            raise ConfigError("a repository needs a name")
        if len(self.name) > REPOSITORY_NAME_MAX or not _REPOSITORY_NAME.fullmatch(self.name):
            raise ConfigError(
                f"repository name {self.name[:80]!r} is not allowed: use at most "
                f"{REPOSITORY_NAME_MAX} lower-case letters, digits, '-' and '.', starting and "
                "ending with a letter or digit (a Kubernetes-style name)"
            )
        if not self.urls:
            raise ConfigError("needs at least one URL", repository=self.name)
        for u in self.urls:
            check_url(u, self.name, self.allow_plain_http)
        if self.concurrency < 1:
            raise ConfigError("concurrency must be at least 1", repository=self.name)
        if self.processes is not None and self.processes < 0:
            raise ConfigError("processes must not be negative", repository=self.name)
        if self.retries.max_attempts < 1:
            raise ConfigError("retries.max_attempts must be at least 1", repository=self.name)
        if self.offline_max_staleness is not None and self.offline_max_staleness < 0:
            raise ConfigError("offline_max_staleness must not be negative", repository=self.name)
        if (self.client_key is not None) and self.client_cert is None:
            raise ConfigError("client_key given without client_cert", repository=self.name)

    def secrets(self) -> list[str]:
        """The credentials as they are now (for redaction; unreadable ones are skipped)."""
        auth = self.auth
        try:
            if isinstance(auth, BearerAuth):
                return [auth.token()]
            if isinstance(auth, BasicAuth):
                return [auth.password()]
        except ConfigError:
            pass
        return []

    def __repr__(self) -> str:
        urls = ", ".join(display_url(u) for u in self.urls)
        return (
            f"RepositoryConfig(name={self.name!r}, urls=[{urls}], auth={self.auth!r}, "
            f"ca_bundle={self.ca_bundle!r}, client_cert={self.client_cert!r}, "
            f"allow_plain_http={self.allow_plain_http}, concurrency={self.concurrency}, "
            f"processes={self.processes})"
        )

    __str__ = __repr__

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RepositoryConfig:
        """Build from a plain mapping (Helm values / JSON config).

        Keys: name, urls (list or string), auth {type: bearer, token_file} or
        {type: basic, username, password_file}, ca_bundle, client_cert, client_key,
        allow_plain_http, timeouts {connect, read, total}, retries {max_attempts, base_backoff,
        max_backoff, jitter, max_retry_after}, concurrency, processes, max_image_size,
        offline_refs, offline_max_staleness (seconds, or null: no limit).
        """
        d = dict(data)
        name = str(d.pop("name", ""))
        auth_d = d.pop("auth", None)
        auth: Auth | None = None
        if auth_d:
            kind = auth_d.get("type")
            if kind == "bearer":
                auth = BearerAuth(Path(auth_d["token_file"]))
            elif kind == "basic":
                auth = BasicAuth(str(auth_d["username"]), Path(auth_d["password_file"]))
            else:
                raise ConfigError(f"unknown auth type {kind!r}", repository=name or None)
        urls = d.pop("urls", ())
        kwargs: dict[str, Any] = {}
        for key in ("ca_bundle", "client_cert", "client_key"):
            if d.get(key):
                kwargs[key] = Path(d.pop(key))
            else:
                d.pop(key, None)
        if "timeouts" in d:
            kwargs["timeouts"] = Timeouts(**d.pop("timeouts"))
        if "retries" in d:
            kwargs["retries"] = RetryPolicy(**d.pop("retries"))
        for key in (
            "allow_plain_http",
            "concurrency",
            "processes",
            "max_image_size",
            "offline_refs",
            "offline_max_staleness",
        ):
            if key in d:
                kwargs[key] = d.pop(key)
        if d:
            raise ConfigError(f"unknown keys {sorted(d)}", repository=name or None)
        return cls(
            name=name, urls=tuple([urls] if isinstance(urls, str) else urls), auth=auth, **kwargs
        )


def check_url(url: str, repo: str, allow_plain_http: bool) -> None:
    """Reject URLs we will not use; messages never echo userinfo."""
    if "://" not in url:
        if not url or not os.path.isabs(url):
            raise ConfigError(f"a local path must be absolute: {url!r}", repository=repo)
        return
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ConfigError(f"unsupported URL scheme {scheme!r}", repository=repo)
    if "@" in parts.netloc:
        raise ConfigError(
            f"URL {display_url(url)} carries credentials; configure auth instead", repository=repo
        )
    if parts.query or parts.fragment:
        raise ConfigError(
            f"URL {display_url(url)} must not have a query or fragment", repository=repo
        )
    if scheme == "http" and not allow_plain_http:
        raise ConfigError(
            f"plain http:// URL {display_url(url)} refused (set allow_plain_http to allow it)",
            repository=repo,
        )
    if scheme in ("http", "https") and not parts.hostname:
        raise ConfigError(f"URL {display_url(url)} has no host", repository=repo)
    if scheme == "file" and parts.netloc not in ("", "localhost"):
        raise ConfigError("file:// URLs must be local (file:///path)", repository=repo)


def display_url(url: str) -> str:
    """A URL as shown in messages, logs and errors: scheme, host and port only."""
    if "://" not in url:
        return url
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme == "file":
        return "file://" + parts.path
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "")
