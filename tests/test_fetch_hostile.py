"""Repositories that try to hurt the node (issue 11): a local repository whose symlinks lead
out of it, servers that echo credentials or send junk into error messages, a gzip bomb as a
ref body. Each case fails with a clear error that quotes nothing it should not, reads nothing
outside the repository, and holds a bounded amount of memory.

The hostile servers are small HTTP servers of the test's own on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from csi.fetch import FetchError, RepositoryClient, RepositoryConfig, RetryPolicy
from csi.fetch.config import BearerAuth
from csi.fetch.errors import SourceInvalid
from csi.fetch.quoting import quote, redact
from csi.fetch.sources import FileSource
from csi.repo import Repository
from csi.store import Store
from tests.fetchkit import publish

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKEN = "s3cr3t-t0ken-4f9a2c"


# -- local repositories: nothing outside the directory is read ---------------------------------


@pytest.fixture
def secret_dir(tmp_path: Path) -> Path:
    """A directory outside the repository holding a file the driver must never read."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "services").write_bytes(b"# TOP SECRET node file\n" + b"x" * 5000)
    return d


def _pull_error(repo_root: Path, ref: str, store: Path) -> FetchError:
    cfg = RepositoryConfig(
        name="local", urls=(str(repo_root),), retries=RetryPolicy(max_attempts=1)
    )
    with RepositoryClient(cfg) as c, Store(store) as s, pytest.raises(FetchError) as e:
        c.fetch_image(ref, s)
    return e.value


def test_a_ref_directory_linked_outside_is_refused(tmp_path: Path, secret_dir: Path) -> None:
    repo = Repository(tmp_path / "repo", create=True)
    os.symlink(secret_dir, repo.root / "images" / "refs" / "ns")  # images/refs/ns -> elsewhere
    err = _pull_error(repo.root, "ns/services", tmp_path / "store")
    msg = str(err)
    assert "outside the repository" in msg, msg
    assert "5023" not in msg and "SECRET" not in msg and "TOP" not in msg, msg
    # The same through the source itself: refused before anything is read.
    got: list[bytes] = []
    with pytest.raises(SourceInvalid):
        FileSource(repo.root).get("images/refs/ns/services", got.append, accept_symlink=True)
    assert got == []


def test_links_leading_out_by_relative_paths_are_refused(tmp_path: Path, secret_dir: Path) -> None:
    repo = Repository(tmp_path / "repo", create=True)
    up = os.path.relpath(secret_dir, repo.root / "images" / "refs")
    os.symlink(up, repo.root / "images" / "refs" / "up")
    got: list[bytes] = []
    with pytest.raises(SourceInvalid):
        FileSource(repo.root).get("images/refs/up/services", got.append, accept_symlink=True)
    # objects/XX as a link to another directory: an object "found" there is not read either
    data = b"object bytes " * 100
    digest = publish(repo, {"f": data}, "app:v1")
    from csi.image.fsverity import digest_bytes

    h = digest_bytes(data).hex()
    real = repo.root / "objects" / h[:2]
    moved = tmp_path / "elsewhere"
    real.rename(moved)
    os.symlink(moved, real)
    with pytest.raises(SourceInvalid):
        FileSource(repo.root).get(f"objects/{h[:2]}/{h[2:]}", got.append)
    assert got == []
    # Links that stay inside the repository keep working (images/<hex> -> ../objects/..).
    out: list[bytes] = []
    FileSource(repo.root).get(f"images/{digest.hex()}", out.append)
    assert b"".join(out) == (repo.root / "images" / digest.hex()).read_bytes()


# -- hostile HTTP servers ------------------------------------------------------------------------

Answer = Callable[[BaseHTTPRequestHandler], None]


@contextlib.contextmanager
def hostile_server(answer: Answer) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            answer(self)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.handle_error = lambda *a: None  # type: ignore[method-assign]  # clients hang up
    t = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def _send(h: BaseHTTPRequestHandler, status: int, body: bytes, **headers: str) -> None:
    h.send_response(status)
    for k, v in headers.items():
        h.send_header(k.replace("_", "-"), v)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def _client(url: str, tmp_path: Path, **kw: object) -> RepositoryClient:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    cfg = RepositoryConfig(
        name="hostile",
        urls=(url,),
        allow_plain_http=True,
        auth=BearerAuth(token),
        retries=RetryPolicy(max_attempts=1),
        **kw,  # type: ignore[arg-type]
    )
    return RepositoryClient(cfg)


def _assert_clean(msg: str) -> None:
    assert TOKEN not in msg, msg
    assert all(0x20 <= ord(ch) < 0x7F for ch in msg), repr(msg)
    assert len(msg) < 600, len(msg)


def test_an_echoed_token_and_junk_never_reach_the_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def answer(h: BaseHTTPRequestHandler) -> None:
        echoed = h.headers.get("Authorization", "").encode()
        junk = b"\x1b[31m\r\nSet-Cookie: x\x00" + echoed + b"\n" + b"A" * 3000
        _send(h, 200, junk, Content_Type="text/x-symlink-target")

    with (
        hostile_server(answer) as url,
        _client(url, tmp_path) as c,
        pytest.raises(FetchError) as e,
    ):
        c.resolve("app:v1")
    _assert_clean(str(e.value))
    assert "symlink target" in str(e.value)
    for rec in caplog.records:
        assert TOKEN not in rec.getMessage()


def test_a_redirect_with_credentials_is_not_quoted(tmp_path: Path) -> None:
    def answer(h: BaseHTTPRequestHandler) -> None:
        target = f"gopher://admin:{TOKEN}@evil.example/x?sig={TOKEN}"
        _send(h, 302, b"", Location=target)

    with (
        hostile_server(answer) as url,
        _client(url, tmp_path) as c,
        pytest.raises(FetchError) as e,
    ):
        c.resolve("app:v1")
    _assert_clean(str(e.value))


def test_an_image_link_to_junk_is_quoted_bounded(tmp_path: Path) -> None:
    h = "ab" * 32

    def answer(req: BaseHTTPRequestHandler) -> None:
        if req.path.startswith("/images/refs/"):
            _send(req, 200, f"../{h}".encode(), Content_Type="text/x-symlink-target")
        else:
            body = b"../../" + TOKEN.encode() + b"\x07" * 500
            _send(req, 200, body, Content_Type="text/x-symlink-target")

    with (
        hostile_server(answer) as url,
        _client(url, tmp_path) as c,
        Store(tmp_path / "store") as s,
        pytest.raises(FetchError) as e,
    ):
        c.fetch_image("app:v1", s)
    _assert_clean(str(e.value))
    assert "not to its object" in str(e.value)


def test_quote_and_redact() -> None:
    q = quote("x\x00y" + "z" * 500)
    assert q.startswith("'x?y") and q.endswith("...'") and len(q) <= 82
    assert "tok" not in quote("see https://u:tok@h.example:8/p?a=tok#f")
    assert redact(f"a {TOKEN} b {TOKEN}", [TOKEN, "", "ab"]) == "a *** b ***"


# -- memory: a gzip bomb as a ref body ------------------------------------------------------------

# Peak memory from VmHWM: it belongs to the process's own address space (ru_maxrss would
# carry over the pytest process's peak through fork and exec).
BOMB_CLIENT = """
import json, sys
from csi.fetch import FetchError, RepositoryClient, RepositoryConfig, RetryPolicy

def hwm_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

cfg = RepositoryConfig(name="bomb", urls=(sys.argv[1],), allow_plain_http=True,
                       retries=RetryPolicy(max_attempts=2, base_backoff=0.01))
base = hwm_kib()
try:
    RepositoryClient(cfg).resolve("app:v1")
    outcome = "resolved"
except FetchError as e:
    outcome = str(e)
print(json.dumps({"outcome": outcome, "base_kib": base, "peak_kib": hwm_kib()}))
"""


def _run_bomb_client(url: str) -> dict[str, object]:
    r = subprocess.run(
        [sys.executable, "-c", BOMB_CLIENT, url],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    res: dict[str, object] = json.loads(r.stdout)
    res["grown_mib"] = (int(res["peak_kib"]) - int(res["base_kib"])) / 1024  # type: ignore[call-overload]
    return res


def test_a_large_ref_body_is_held_once() -> None:
    """A 96 MiB body under the limit (gzip'd, so cheap to serve) that is no image: the client
    holds it once (before: twice, as a buffer and a copy of it for parsing; and held back
    whole until its content type was known, then joined)."""
    body = gzip.compress(b"\0" * (96 << 20), compresslevel=1)

    def answer(h: BaseHTTPRequestHandler) -> None:
        _send(h, 200, body, Content_Encoding="gzip", Content_Type="application/octet-stream")

    with hostile_server(answer) as url:
        res = _run_bomb_client(url)
    assert "neither a symlink target nor a composefs image" in str(res["outcome"]), res
    assert float(res["grown_mib"]) < 96 * 1.5, res  # type: ignore[arg-type]


def test_a_gzip_bomb_ref_is_cut_off_at_the_image_limit() -> None:
    """1 GiB of zeros, gzip'd to about 1 MB, as a ref's body. With the default limit the
    client stops at 256 MiB of decompressed body and holds it once: before, it held the 1 GiB
    limit about three times over (a 3 GB peak against a 1 GiB pod limit)."""
    bomb = gzip.compress(b"\0" * (1 << 30), compresslevel=1)

    def answer(h: BaseHTTPRequestHandler) -> None:
        _send(h, 200, bomb, Content_Encoding="gzip", Content_Type="application/octet-stream")

    with hostile_server(answer) as url:
        res = _run_bomb_client(url)
    assert "larger than" in str(res["outcome"]) and "limit" in str(res["outcome"]), res
    assert float(res["grown_mib"]) < 400, res  # type: ignore[arg-type]
