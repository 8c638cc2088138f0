"""HTTP(S) mirrors through libcurl (pycurl).

Chosen by measurement (docs/benchmarks.md, "HTTP client choice"): per-thread pycurl easy handles
fetched 4 KiB objects 2-6x faster than urllib3 with the same thread count, and large bodies as
fast or faster. Each worker thread keeps one handle per mirror, so connections are reused across
objects and across fetches.

Timeouts: ``connect`` -> libcurl CONNECTTIMEOUT, ``total`` -> TIMEOUT (one whole object), ``read``
-> a progress callback that aborts when no byte arrived for that long (libcurl's LOW_SPEED check
averages over several seconds, too coarse for this). Credentials are given
to libcurl as auth options (never placed in URLs) and libcurl does not send them to another host
on redirects.
"""

from __future__ import annotations

import os
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import pycurl

from .config import BearerAuth, RepositoryConfig, display_url
from .errors import (
    SourceBadResponse,
    SourceDenied,
    SourceError,
    SourceNotFound,
    SourceTimeout,
    SourceTransient,
)
from .quoting import quote
from .source import SYMLINK_CONTENT_TYPE, SYMLINK_MAX, OnData, Response, Source, Validators

#: CA bundles tried when none is configured (libcurl in the pycurl wheel looks elsewhere).
SYSTEM_CA_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
)
_AUTH_TTL = 5.0
_HTTPAUTH_BEARER = getattr(pycurl, "HTTPAUTH_BEARER", 1 << 6)  # CURLAUTH_BEARER
_BUFFER = 1 << 20
#: Body bytes buffered per transfer before they are passed on: libcurl delivers 16 KiB
#: chunks, and each callback into Python (and each hashing or write call after it) is a GIL
#: hand-off between the worker threads; most objects are passed on in one piece.
_FLUSH = 1 << 20

# libcurl error codes (curl/curl.h)
_HTTP_RETURNED_ERROR = 22  # a status >= 400 with FAILONERROR
_TIMEOUTS = {28}  # OPERATION_TIMEDOUT
_TLS_PERMANENT = {51, 58, 59, 60, 77, 83, 90, 91}
_PROTOCOL = {1, 3}  # unsupported protocol, malformed URL


class _Transfer:
    """State of one request, fed by libcurl callbacks.

    Object requests have no header callback (about ten calls into Python per object saved):
    error statuses end the transfer in libcurl (``FAILONERROR``) before any of their body is
    passed on, and the status, content type and Retry-After are read from libcurl afterwards.
    A request that may answer with a symlink target (``accept_symlink``: refs, image links)
    does read its headers: it holds back at most :data:`SYMLINK_MAX` bytes while the answer is
    a symlink target, and streams anything else on like an object (so an image served as a
    ref's body is never held twice).
    """

    __slots__ = (
        "abort",
        "chunks",
        "conditional",
        "content_type",
        "etag",
        "hold",
        "idle_limit",
        "last_data",
        "last_modified",
        "last_now",
        "max_size",
        "on_data",
        "pending",
        "sink_failed",
        "size",
        "span",
    )

    def __init__(
        self, on_data: OnData, accept_symlink: bool, max_size: int | None, idle_limit: float
    ) -> None:
        self.on_data = on_data
        self.idle_limit = idle_limit
        self.last_data = time.monotonic()
        self.last_now = 0
        self.hold = accept_symlink  # pass nothing on before the content type is known
        self.max_size = max_size
        self.size = 0
        self.abort: BaseException | None = None
        self.chunks: list[bytes] = []
        self.pending = 0
        self.sink_failed = False
        self.content_type: str | None = None
        self.span: tuple[int, int] | None = None
        self.conditional = False
        self.etag: str | None = None
        self.last_modified: str | None = None

    def header(self, line: bytes) -> None:
        """Header callback of ``accept_symlink`` requests: the last response's content type
        (a redirect's headers come first and are forgotten at the next status line)."""
        if line[:5] == b"HTTP/":
            self.content_type = self.etag = self.last_modified = None
        elif line[:13].lower() == b"content-type:":
            value = line[13:].decode("latin-1").split(";")[0].strip().lower()
            self.content_type = value[:100]
        elif line[:5].lower() == b"etag:":
            self.etag = _validator(line[5:])
        elif line[:14].lower() == b"last-modified:":
            self.last_modified = _validator(line[14:])

    def progress(self, _dltotal: int, dlnow: int, _ultotal: int, _ulnow: int) -> int:
        """Read timeout: abort when no byte arrived for ``idle_limit`` seconds."""
        now = time.monotonic()
        if dlnow != self.last_now:
            self.last_now = dlnow
            self.last_data = now
        elif now - self.last_data > self.idle_limit:
            self.abort = SourceTimeout(f"timed out: no data for {self.idle_limit:g} s")
            return 1
        return 0

    def idle(self, now: float) -> bool:
        """The read timeout of a transfer that has no progress callback (:meth:`HttpSource.
        get_many` checks its transfers itself): no body byte for ``idle_limit`` seconds since
        it started or since the last one."""
        if now - self.last_data <= self.idle_limit:
            return False
        self.abort = SourceTimeout(f"timed out: no data for {self.idle_limit:g} s")
        return True

    def write(self, data: bytes) -> int | None:
        self.last_data = time.monotonic()
        try:
            self.size += len(data)
            if self.max_size is not None and self.size > self.max_size:
                raise SourceBadResponse(f"body larger than the {self.max_size}-byte limit")
            if self.hold:
                if self.content_type != SYMLINK_CONTENT_TYPE:
                    self.hold = False  # not a symlink target: stream it like any body
                elif self.size > SYMLINK_MAX:
                    raise SourceBadResponse(f"symlink target longer than {SYMLINK_MAX} bytes")
            self.chunks.append(data)
            self.pending += len(data)
            if self.pending >= _FLUSH and not self.hold:
                self.flush()
        except BaseException as e:  # carried out of libcurl, re-raised by get()
            self.abort = e
            return 0
        return None

    def flush(self) -> None:
        """Pass the buffered body on (one call per ``_FLUSH`` bytes rather than per chunk)."""
        chunks = self.chunks
        if not chunks:
            return
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.pending = 0
        try:
            self.on_data(data)
        except BaseException:
            self.sink_failed = True
            raise

    def body(self) -> bytes:
        """Everything held back (``accept_symlink``), taken out."""
        data = b"".join(self.chunks)
        self.chunks.clear()
        self.pending = 0
        return data


#: Longest wait for any of several requests; their read timeouts are checked this often.
_IDLE_CHECK = 0.25
J = TypeVar("J")


@dataclass(frozen=True, slots=True)
class Request:
    """One request of :meth:`HttpSource.get_many`."""

    relpath: str
    on_data: OnData
    max_size: int | None = None
    #: (offset, length): a Range request for those bytes (``max_size`` is then ``length``).
    span: tuple[int, int] | None = None


class HttpSource(Source):
    """One ``http(s)://`` mirror."""

    def __init__(self, base_url: str, config: RepositoryConfig) -> None:
        self.base = base_url if base_url.endswith("/") else base_url + "/"
        self.label = display_url(base_url)
        self.identity = self.base
        self.config = config
        self._local = threading.local()
        self._auth_lock = threading.Lock()
        self._auth_cache: tuple[float, tuple[str, ...]] | None = None
        self._ca = str(config.ca_bundle) if config.ca_bundle else _system_ca()
        https_only = urllib.parse.urlsplit(self.base).scheme == "https" or not (
            config.allow_plain_http
        )
        self._protocols = (
            pycurl.PROTO_HTTPS if https_only else (pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        )

    def _credentials(self) -> tuple[str, ...]:
        """("bearer", token) or ("basic", user, password), re-read every few seconds."""
        auth = self.config.auth
        if auth is None:
            return ()
        now = time.monotonic()
        with self._auth_lock:
            if self._auth_cache is not None and now - self._auth_cache[0] < _AUTH_TTL:
                return self._auth_cache[1]
            creds: tuple[str, ...]
            if isinstance(auth, BearerAuth):
                creds = ("bearer", auth.token())
            else:
                creds = ("basic", auth.username, auth.password())
            self._auth_cache = (now, creds)
            return creds

    def _new_handle(self, *, progress: bool = True) -> pycurl.Curl:
        c = pycurl.Curl()
        t = self.config.timeouts
        c.setopt(pycurl.NOSIGNAL, 1)
        c.setopt(pycurl.BUFFERSIZE, _BUFFER)
        c.setopt(pycurl.PROTOCOLS, self._protocols)
        c.setopt(pycurl.REDIR_PROTOCOLS, self._protocols)
        c.setopt(pycurl.FOLLOWLOCATION, 1)
        c.setopt(pycurl.MAXREDIRS, 5)
        c.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
        c.setopt(pycurl.FAILONERROR, 1)  # error bodies never reach the write callback
        c.setopt(pycurl.ACCEPT_ENCODING, "")  # any encoding libcurl can decode (zstd, gzip...)
        c.setopt(pycurl.CONNECTTIMEOUT_MS, max(1, int(t.connect * 1000)))
        c.setopt(pycurl.TIMEOUT_MS, max(1, int(t.total * 1000)))
        # XFERINFOFUNCTION enforces the read timeout; get_many's handles have none (about
        # eight calls into Python per object saved) and it checks their transfers itself.
        c.setopt(pycurl.NOPROGRESS, 0 if progress else 1)
        c.setopt(pycurl.USERAGENT, "composefs-csi")
        if self._ca:
            c.setopt(pycurl.CAINFO, self._ca)
        if self.config.client_cert is not None:
            c.setopt(pycurl.SSLCERT, str(self.config.client_cert))
            if self.config.client_key is not None:
                c.setopt(pycurl.SSLKEY, str(self.config.client_key))
        return c

    def _handle(self) -> pycurl.Curl:
        c: pycurl.Curl | None = getattr(self._local, "curl", None)
        if c is None:
            c = self._local.curl = self._new_handle()
        return c

    def _begin(
        self,
        c: pycurl.Curl,
        relpath: str,
        on_data: OnData,
        accept_symlink: bool,
        max_size: int | None,
        progress: bool = True,
        span: tuple[int, int] | None = None,
        validators: Validators | None = None,
    ) -> _Transfer:
        """Set ``c`` up for one request; the returned transfer receives its callbacks. Without
        ``progress`` (a handle made with ``progress=False``) the caller checks the read timeout
        with :meth:`_Transfer.idle`."""
        creds = self._credentials()
        if creds and creds[0] == "bearer":
            c.setopt(pycurl.HTTPAUTH, _HTTPAUTH_BEARER)
            c.setopt(pycurl.XOAUTH2_BEARER, creds[1])
        elif creds:
            c.setopt(pycurl.HTTPAUTH, pycurl.HTTPAUTH_BASIC)
            c.setopt(pycurl.USERNAME, creds[1])
            c.setopt(pycurl.PASSWORD, creds[2])
        tr = _Transfer(on_data, accept_symlink, max_size, self.config.timeouts.read)
        if validators:
            # The ETag alone when there is one: If-Modified-Since compares times, and two
            # versions may share one (a second's resolution).
            if validators.etag:
                header = f"If-None-Match: {validators.etag}"
            else:
                header = f"If-Modified-Since: {validators.last_modified}"
            c.setopt(pycurl.HTTPHEADER, [header])
            tr.conditional = True
        if span is not None:
            # Offsets into the file as it is: no content encoding.
            c.setopt(pycurl.RANGE, f"{span[0]}-{span[0] + span[1] - 1}")
            c.setopt(pycurl.ACCEPT_ENCODING, None)
            tr.span = span
        c.setopt(pycurl.URL, self.base + urllib.parse.quote(relpath, safe="/:@+=-._~"))
        c.setopt(pycurl.WRITEFUNCTION, tr.write)
        if accept_symlink:
            c.setopt(pycurl.HEADERFUNCTION, tr.header)
        if progress:
            c.setopt(pycurl.XFERINFOFUNCTION, tr.progress)
        return tr

    @staticmethod
    def _end(c: pycurl.Curl, tr: _Transfer, code: int, msg: str) -> Response:
        """The outcome of a transfer libcurl ended with ``code`` (0: no error): its response,
        or the error to raise. What arrived of a failed transfer is passed on first (the caller
        counts it); an error of the caller's ``on_data`` wins over any other."""
        _reset(c)
        if tr.span is not None:
            _reset_span(c)
        if tr.conditional:
            c.unsetopt(pycurl.HTTPHEADER)
        if not tr.sink_failed and not tr.hold:
            try:
                tr.flush()
            except BaseException as e:
                tr.abort = e
        if tr.abort is not None:
            raise tr.abort
        if code == _HTTP_RETURNED_ERROR:
            raise _status_error(c)
        if code:
            raise _curl_error(code, msg)
        status = int(c.getinfo(pycurl.RESPONSE_CODE))
        if status == 304 and tr.conditional:
            return Response(0, not_modified=True)
        if tr.span is not None:
            # 206 for the range; a server that ignores Range answers 200 with the whole
            # file, which is the range only when the range starts at 0 (the size limit
            # stopped anything longer).
            if status != 206 and not (status == 200 and tr.span[0] == 0):
                if status == 200:
                    raise SourceBadResponse("the server ignored the Range request")
                raise _status_error(c)
            if tr.size != tr.span[1]:
                raise SourceBadResponse(f"{tr.size} bytes for a range of {tr.span[1]}")
        elif status != 200:
            # A status FAILONERROR lets through (below 400, or an auth answer): whatever was
            # passed on is then rejected by the caller along with this error.
            raise _status_error(c)
        found = Validators(tr.etag, tr.last_modified)
        validators = found if found else None
        if not tr.hold:
            return Response(tr.size, validators=validators)
        data = tr.body()
        if tr.content_type == SYMLINK_CONTENT_TYPE:
            # "" is rejected later
            return Response(len(data), data.decode("utf-8", "replace"), validators=validators)
        if data:
            tr.on_data(data)
        return Response(tr.size, validators=validators)

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
        c = self._handle()
        if span is not None:
            max_size = span[1]
        tr = self._begin(
            c,
            relpath,
            on_data,
            accept_symlink,
            max_size,
            span=span,
            validators=validators if accept_symlink else None,
        )
        code, msg = 0, ""
        try:
            c.perform()
        except pycurl.error as e:
            code = int(e.args[0]) if e.args else -1
            msg = str(e.args[1]) if len(e.args) > 1 else ""
        except BaseException:
            _reset(c)
            _reset_span(c)
            c.unsetopt(pycurl.HTTPHEADER)
            raise
        return self._end(c, tr, code, msg)

    def get_many(
        self, jobs: Iterable[J], begin: Callable[[J], Request], *, parallel: int
    ) -> Iterator[tuple[J, Response | Exception]]:
        """Run up to ``parallel`` requests at a time over one libcurl multi handle, each as
        :meth:`get` would (same options, checks and errors), and yield every job with its
        response or error as it ends. ``begin(job)`` is called when the job's request is about
        to start and gives its path, ``on_data`` and size limit; an exception it raises is
        that job's outcome. The handles (and their connections) are kept per thread.

        The requests share one wait: a process fetching many objects sleeps and wakes once
        for several of them, not once per object.
        """
        parallel = max(1, parallel)
        multi = pycurl.CurlMulti()
        # This call's handles are taken out of the thread's spares (a second get_many running
        # in the same thread, interleaved with this one, gets others) and put back after.
        idle: list[pycurl.Curl] = getattr(self._local, "many", [])
        self._local.many = []
        active: dict[pycurl.Curl, tuple[J, _Transfer]] = {}
        it = iter(jobs)
        more = True
        checked = time.monotonic()
        try:
            while more or active:
                while more and len(active) < parallel:
                    try:
                        job = next(it)
                    except StopIteration:
                        more = False
                        break
                    try:
                        req = begin(job)
                    except Exception as e:
                        yield job, e
                        continue
                    c = idle.pop() if idle else self._new_handle(progress=False)
                    tr = self._begin(
                        c,
                        req.relpath,
                        req.on_data,
                        False,
                        req.span[1] if req.span is not None else req.max_size,
                        False,
                        req.span,
                    )
                    multi.add_handle(c)
                    active[c] = (job, tr)
                while multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
                    pass
                ended: list[tuple[pycurl.Curl, int, str]] = []
                while True:
                    queued, ok, failed = multi.info_read()
                    ended.extend((c, 0, "") for c in ok)
                    ended.extend((c, int(code), str(msg)) for c, code, msg in failed)
                    if not queued:
                        break
                now = time.monotonic()
                if now - checked >= _IDLE_CHECK:
                    checked = now
                    over = {e[0] for e in ended}
                    ended.extend(
                        (c, 0, "")
                        for c, (_, tr) in active.items()
                        if c not in over and tr.idle(now)
                    )
                for c, code, msg in ended:
                    multi.remove_handle(c)
                    job, tr = active.pop(c)
                    idle.append(c)
                    try:
                        outcome: Response | Exception = self._end(c, tr, code, msg)
                    except Exception as e:
                        outcome = e
                    yield job, outcome
                if active and not ended:
                    wait_ms = multi.timeout()  # libcurl's next timer (-1: none)
                    multi.select(_IDLE_CHECK if wait_ms < 0 else min(wait_ms / 1000, _IDLE_CHECK))
        finally:
            for c in active:
                multi.remove_handle(c)
                _reset(c)
                _reset_span(c)
                idle.append(c)
            multi.close()
            self._local.many = [*self._local.many, *idle]  # kept: connections are reused

    def _drop_handle(self) -> None:
        c = getattr(self._local, "curl", None)
        if c is not None:
            self._local.curl = None
            c.close()
        for c in getattr(self._local, "many", ()):
            c.close()
        self._local.many = []

    def close(self) -> None:
        self._drop_handle()


def _reset(c: pycurl.Curl) -> None:
    """Drop the handle's references to its last transfer (and what its callbacks hold)."""
    c.setopt(pycurl.WRITEFUNCTION, _noop_write)
    c.setopt(pycurl.XFERINFOFUNCTION, _noop_progress)
    c.unsetopt(pycurl.HEADERFUNCTION)


def _reset_span(c: pycurl.Curl) -> None:
    """Back to whole-file requests after a Range request."""
    c.unsetopt(pycurl.RANGE)
    c.setopt(pycurl.ACCEPT_ENCODING, "")


def _noop_write(_data: bytes) -> int | None:
    return None


def _noop_progress(_a: int, _b: int, _c: int, _d: int) -> int:
    return 0


def _validator(raw: bytes) -> str | None:
    """An ``ETag`` or ``Last-Modified`` value, kept only if short and printable (it is sent
    back as a request header and stored)."""
    value = raw.decode("latin-1").strip()
    if not value or len(value) > 200 or not value.isprintable() or not value.isascii():
        return None
    return value


def _system_ca() -> str | None:
    env = os.environ.get("SSL_CERT_FILE")
    if env and os.path.isfile(env):
        return env
    for p in SYSTEM_CA_BUNDLES:
        if os.path.isfile(p):
            return p
    return None


def _status_error(c: pycurl.Curl) -> SourceError:
    """The error for the last response's status (not 200)."""
    status = int(c.getinfo(pycurl.RESPONSE_CODE))
    # Retry-After as libcurl parsed it: seconds, from a number or an HTTP date; 0 if none.
    wait = int(c.getinfo(pycurl.RETRY_AFTER))
    retry_after = float(wait) if wait > 0 else None
    if status in (404, 410):
        return SourceNotFound(f"HTTP {status}: not found")
    if status in (401, 403):
        return SourceDenied(f"HTTP {status}: access denied (check the repository credentials)")
    if status in (408, 429) or 500 <= status <= 599:
        return SourceTransient(f"HTTP {status}", retry_after=retry_after)
    return SourceBadResponse(f"unexpected HTTP status {status}")


def _curl_error(code: int, message: str) -> SourceError:
    # libcurl's message may carry what the server sent (a redirect's location, a host name
    # from it): quoted, bounded and without URL credentials.
    msg = quote(message)
    if code in _TIMEOUTS:
        return SourceTimeout(f"timed out ({msg})")
    if code in _TLS_PERMANENT:
        return SourceBadResponse(f"TLS failure ({msg})")
    if code in _PROTOCOL:
        return SourceBadResponse(f"refused ({msg})")
    if code == 47:
        return SourceBadResponse(f"too many redirects ({msg})")
    return SourceTransient(f"connection error ({msg})")
