"""A small HTTP(S) client for registries, on the standard library's ``http.client``.

Why not the project's libcurl client (:mod:`csi.fetch.http`): that one is built for many small
objects in parallel, pushes bodies into callbacks and sits above the repository layer. An
import reads a few large blobs one after the other, and pulls them: the tar reader asks for
the next bytes when it needs them, so a blocking ``read(n)`` on the response is the whole
streaming machinery (no thread, no queue), and headers such as ``WWW-Authenticate`` or
``Docker-Content-Digest`` are at hand. TLS is :mod:`ssl` with the system CAs, or the file of
CAs given.

- One keep-alive connection per host, reused while each response is read to its end.
- Redirects (301/302/303/307/308, at most 5) are followed; the ``Authorization`` header is
  sent to the redirect target only if it is the same scheme, host and port (blob downloads
  are often redirected to a storage service that must not see registry credentials).
- GETs are retried (3 attempts, backoff) on connection failures, 429 and 5xx answers.
- Plain ``http://`` is refused unless allowed.
- Nothing that may hold a secret (headers, URLs with user info) goes into messages or logs.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass

from .errors import RegistryError

log = logging.getLogger(__name__)

USER_AGENT = "composefs-csi-import"
_REDIRECTS = (301, 302, 303, 307, 308)
_RETRY_STATUS = (429, 500, 502, 503, 504)
MAX_REDIRECTS = 5
ATTEMPTS = 3


@dataclass(frozen=True)
class HttpOptions:
    ca_bundle: str | None = None
    allow_plain_http: bool = False
    #: Seconds without progress on a connection before giving up.
    timeout: float = 60.0
    #: First retry delay (doubled each time).
    backoff: float = 0.5


def redact(url: str) -> str:
    """``url`` without user info or query (query strings may carry signed tokens)."""
    p = urllib.parse.urlsplit(url)
    host = p.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{p.port}" if p.port else "")
    return urllib.parse.urlunsplit((p.scheme, netloc, p.path, "", ""))


class Response:
    """A response whose body is read with :meth:`read` (``b""`` at its end)."""

    def __init__(self, client: HttpClient, key: str, resp: http.client.HTTPResponse, url: str):
        self._client = client
        self._key = key
        self._resp = resp
        self.status = resp.status
        self.headers = resp.headers
        self.url = url

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def read(self, n: int = -1) -> bytes:
        try:
            return self._resp.read(n if n >= 0 else None)
        except (OSError, http.client.HTTPException) as e:
            self._client._drop(self._key)
            raise RegistryError(f"reading from {redact(self.url)} failed: {e}") from None

    def read_all(self, limit: int) -> bytes:
        """The whole body, refused if longer than ``limit``."""
        length = self.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > limit:
            self.close()
            raise RegistryError(f"{redact(self.url)}: answer of {length} bytes is too large")
        data = self.read(limit + 1)
        if len(data) > limit:
            self.close()
            raise RegistryError(f"{redact(self.url)}: answer larger than {limit} bytes")
        self.close()
        return data

    def close(self) -> None:
        """Finish with the response; the connection is kept only if the body was all read."""
        if self._resp.isclosed():
            return
        if self._resp.length == 0:
            self._resp.close()
            return
        self._resp.close()
        self._client._drop(self._key)


class HttpClient:
    def __init__(self, options: HttpOptions) -> None:
        self.options = options
        self._conns: dict[str, http.client.HTTPConnection] = {}
        self._ssl: ssl.SSLContext | None = None

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            try:
                self._ssl = ssl.create_default_context(cafile=self.options.ca_bundle)
            except (OSError, ssl.SSLError) as e:
                raise RegistryError(f"cannot load CA bundle {self.options.ca_bundle}: {e}") from e
        return self._ssl

    def _conn(self, scheme: str, netloc: str) -> tuple[str, http.client.HTTPConnection]:
        key = f"{scheme}://{netloc}"
        conn = self._conns.get(key)
        if conn is None:
            timeout = self.options.timeout
            if scheme == "https":
                conn = http.client.HTTPSConnection(netloc, timeout=timeout, context=self._context())
            else:
                conn = http.client.HTTPConnection(netloc, timeout=timeout)
            self._conns[key] = conn
        return key, conn

    def _drop(self, key: str) -> None:
        conn = self._conns.pop(key, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for key in list(self._conns):
            self._drop(key)

    def get(
        self,
        url: str,
        headers: dict[str, str] | None = None,
        *,
        auth: str | None = None,
    ) -> Response:
        """GET ``url`` (following redirects); ``auth`` is the ``Authorization`` value, sent to
        the original origin only. Every status is returned (the caller decides)."""
        origin = _origin(url)
        for _ in range(MAX_REDIRECTS + 1):
            hdrs = {"User-Agent": USER_AGENT, **(headers or {})}
            if auth is not None and _origin(url) == origin:
                hdrs["Authorization"] = auth
            resp = self._get_retrying(url, hdrs)
            if resp.status not in _REDIRECTS:
                return resp
            location = resp.header("Location")
            with contextlib.suppress(RegistryError):
                resp.read_all(1 << 16)  # a short body: read it, so the connection is reused
            if not location:
                raise RegistryError(f"{redact(url)}: redirect without a Location")
            url = urllib.parse.urljoin(url, location)
        raise RegistryError(f"{redact(url)}: more than {MAX_REDIRECTS} redirects")

    def _get_retrying(self, url: str, headers: dict[str, str]) -> Response:
        delay = self.options.backoff
        for attempt in range(1, ATTEMPTS + 1):
            try:
                resp = self._get_once(url, headers)
            except RegistryError:
                if attempt == ATTEMPTS:
                    raise
            else:
                if resp.status not in _RETRY_STATUS or attempt == ATTEMPTS:
                    return resp
                wait = _retry_after(resp.header("Retry-After"), delay)
                resp.close()
                log.info("%s answered %d; retrying in %.1f s", redact(url), resp.status, wait)
                time.sleep(wait)
                delay *= 2
                continue
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _get_once(self, url: str, headers: dict[str, str]) -> Response:
        p = urllib.parse.urlsplit(url)
        if p.scheme not in ("http", "https") or not p.netloc:
            raise RegistryError(f"refusing the URL {redact(url)} (only http(s) URLs)")
        if p.scheme == "http" and not self.options.allow_plain_http:
            raise RegistryError(
                f"refusing plain HTTP to {redact(url)} (use --plain-http for a registry "
                "without TLS)"
            )
        target = p.path or "/"
        if p.query:
            target += "?" + p.query
        netloc = p.netloc.rpartition("@")[2]  # never send user info in a Host header
        for fresh in (False, True):
            key, conn = self._conn(p.scheme, netloc)
            try:
                conn.request("GET", target, headers=headers)
                return Response(self, key, conn.getresponse(), url)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._drop(key)  # a kept-alive connection the server had closed: once more
                if fresh:
                    raise RegistryError(
                        f"{redact(url)}: the server closed the connection"
                    ) from None
            except ssl.SSLCertVerificationError as e:
                self._drop(key)
                raise RegistryError(
                    f"{redact(url)}: TLS certificate not trusted ({e.verify_message}); "
                    "give the CA with --ca-bundle"
                ) from None
            except (OSError, http.client.HTTPException) as e:
                self._drop(key)
                reason = (
                    "timed out" if isinstance(e, socket.timeout) else str(e) or type(e).__name__
                )
                raise RegistryError(f"{redact(url)}: {reason}") from None
        raise AssertionError("unreachable")


def _origin(url: str) -> tuple[str, str, int | None]:
    p = urllib.parse.urlsplit(url)
    with contextlib.suppress(ValueError):
        return (p.scheme, (p.hostname or "").lower(), p.port)
    return (p.scheme, "", None)


def _retry_after(value: str | None, default: float) -> float:
    if value and value.strip().isdigit():
        return min(float(value.strip()), 30.0)
    return default
