"""Helpers for the fetch tests: repositories built with csi.repo, nginx configurations that serve
them in several ways, a fault-injecting HTTP proxy, and TLS material made with the openssl CLI."""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import random
import shutil
import socket
import stat
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from csi.image.fsverity import digest_bytes, digest_file
from csi.image.tree import Node, Tree, object_path
from csi.image.writer import write_image
from csi.repo import Repository

BEARER_TOKEN = "tok-Zq81-very-secret"
BASIC_USER = "puller"
BASIC_PASSWORD = "pw-Xk3-very-secret"


# -- repositories ----------------------------------------------------------------------------


def publish(repo: Repository, files: dict[str, bytes], ref: str | None = None) -> bytes:
    """Publish a flat tree of ``files`` (name -> content) as an image; returns its digest."""
    root = Node(mode=stat.S_IFDIR | 0o755)
    for name, data in sorted(files.items()):
        if len(data) <= 64:
            node = Node(mode=stat.S_IFREG | 0o644, size=len(data), content=data)
        else:
            d, _ = repo.add_object_bytes(data)
            node = Node(mode=stat.S_IFREG | 0o644, size=len(data), payload=object_path(d), digest=d)
        root.add(name.encode(), node)
    digest = repo.add_image(write_image(Tree(root)))
    if ref is not None:
        repo.set_ref(ref, digest)
    return digest


def object_rel(digest: bytes) -> str:
    h = digest.hex()
    return f"objects/{h[:2]}/{h[2:]}"


def make_linktexts(repo_root: Path, out: Path) -> None:
    """A tree of plain files holding the link text of every symlink under ``images/``, as a
    bucket upload would store them (served with Content-Type text/x-symlink-target)."""
    base = repo_root / "images"
    for dirpath, _dirs, files in os.walk(base):
        for f in files:
            p = Path(dirpath) / f
            if p.is_symlink():
                dst = out / "images" / p.relative_to(base)
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_text(os.readlink(p))


def store_is_verified(store_root: Path) -> int:
    """Assert every file under the store's objects/ hashes to its name; return the count."""
    n = 0
    for p in (store_root / "objects").glob("*/*"):
        name = p.parent.name + p.name
        assert digest_file(p).hex() == name, f"unverified object {p}"
        n += 1
    return n


# -- nginx configurations ----------------------------------------------------------------------


def repo_server(repo_root: Path, links: Path) -> str:
    """Port ``{port}``: ``/`` static (refs come back as image bytes), ``/bucket/`` where
    ``images/`` answers link texts as text/x-symlink-target, ``/bearer/`` and ``/basic/`` which
    check credentials."""
    basic = base64.b64encode(f"{BASIC_USER}:{BASIC_PASSWORD}".encode()).decode()
    return f"""
    server {{
        listen 127.0.0.1:{{port}};
        root {repo_root};
        location / {{ }}
        location /bucket/images/ {{
            alias {links}/images/;
            types {{ }}
            default_type text/x-symlink-target;
        }}
        location /bucket/ {{ alias {repo_root}/; }}
        location /bearer/ {{
            if ($http_authorization != "Bearer {BEARER_TOKEN}") {{ return 401; }}
            alias {repo_root}/;
        }}
        location /basic/ {{
            if ($http_authorization != "Basic {basic}") {{ return 401; }}
            alias {repo_root}/;
        }}
    }}"""


def tls_server(repo_root: Path, tls: TlsFiles) -> str:
    """Port ``{tls}``: HTTPS with a server certificate from the test CA; ``/mtls/`` requires a
    client certificate from the same CA."""
    return f"""
    server {{
        listen 127.0.0.1:{{tls}} ssl;
        ssl_certificate {tls.server_cert};
        ssl_certificate_key {tls.server_key};
        ssl_client_certificate {tls.ca_cert};
        ssl_verify_client optional;
        root {repo_root};
        location / {{ }}
        location /mtls/ {{
            if ($ssl_client_verify != SUCCESS) {{ return 403; }}
            alias {repo_root}/;
        }}
    }}"""


@dataclass
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls(work: Path) -> TlsFiles:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate."""
    work.mkdir(parents=True, exist_ok=True)
    openssl = shutil.which("openssl") or "openssl"

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=work, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=composefs-csi test CA",
    )
    (work / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for who, cn in (("server", "127.0.0.1"), ("client", "test client")):
        run("req", *ec, "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj", f"/CN={cn}")
        extra = ["-extfile", "san.ext"] if who == "server" else []
        run(
            "x509",
            "-req",
            "-in",
            f"{who}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{who}.pem",
            "-days",
            "2",
            *extra,
        )
    return TlsFiles(
        work / "ca.pem",
        work / "server.pem",
        work / "server.key",
        work / "client.pem",
        work / "client.key",
    )


def dead_port() -> int:
    """A loopback port nobody listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- fault-injecting proxy ---------------------------------------------------------------------


@dataclass
class Fault:
    """What the proxy does to a matching request.

    kind: ``status`` (answer ``status``, with ``retry_after`` if set), ``drop`` (send the headers
    and ``after`` bytes of the body, then close), ``stall`` (send the headers and ``after`` bytes,
    then wait ``seconds`` and close), ``flip`` (flip one byte of the body), ``reset`` (close
    without answering). ``match``: substring of the path. ``times``: how many matching requests
    get the fault (``-1``: all), counted per distinct path when ``per_path``.
    """

    kind: str
    match: str = ""
    times: int = 1
    status: int = 500
    retry_after: str | None = None
    after: int = 0
    seconds: float = 5.0
    per_path: bool = False
    hits: Counter[str] = field(default_factory=Counter)


@dataclass
class FaultProxy:
    """A threaded HTTP/1.1 proxy on 127.0.0.1 in front of ``upstream_port``."""

    upstream_port: int
    faults: list[Fault] = field(default_factory=list)
    requests: Counter[str] = field(default_factory=Counter)
    port: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._stop = threading.Event()

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.requests.clear()

    def _pick(self, path: str) -> Fault | None:
        with self._lock:
            self.requests[path] += 1
            for f in self.faults:
                key = path if f.per_path else ""
                if f.match in path and (f.times < 0 or f.hits[key] < f.times):
                    f.hits[key] += 1
                    return f
        return None

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                fault = proxy._pick(self.path)
                if fault is not None and fault.kind == "reset":
                    self.close_connection = True
                    return
                if fault is not None and fault.kind == "status":
                    self.send_response(fault.status)
                    if fault.retry_after is not None:
                        self.send_header("Retry-After", fault.retry_after)
                    body = b"injected failure\n"
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request("GET", self.path, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                conn.close()
                if fault is not None and fault.kind == "flip" and body:
                    i = random.randrange(len(body))
                    body = body[:i] + bytes([body[i] ^ 0x20]) + body[i + 1 :]
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in (
                        "connection",
                        "content-length",
                        "transfer-encoding",
                        "keep-alive",
                        "server",
                        "date",
                    ):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if fault is not None and fault.kind in ("drop", "stall"):
                    self.wfile.write(body[: min(fault.after, max(0, len(body) - 1))])
                    self.wfile.flush()
                    if fault.kind == "stall":
                        proxy._stop.wait(fault.seconds)
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        self.port = int(server.server_address[1])
        threading.Thread(
            target=server.serve_forever, args=(0.05,), name="fault-proxy", daemon=True
        ).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @contextlib.contextmanager
    def running(self) -> Iterator[FaultProxy]:
        self.start()
        try:
            yield self
        finally:
            self.stop()


# -- a served repository shared by the fetch tests --------------------------------------------


@dataclass
class World:
    repo_root: Path
    nginx: object
    tls: TlsFiles
    images: dict[str, bytes]
    files: dict[str, dict[str, bytes]]

    @property
    def port(self) -> int:
        return self.nginx.ports["port"]  # type: ignore[attr-defined,no-any-return]

    @property
    def tls_port(self) -> int:
        return self.nginx.ports["tls"]  # type: ignore[attr-defined,no-any-return]

    def url(self, prefix: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{prefix}"

    @property
    def big_path(self) -> str:
        """The URL path of app:v1's 3 MiB object (``big``), the one faults aim at."""
        return "/" + object_rel(digest_bytes(self.files["app:v1"]["big"]))


def make_files(
    seed: int, n: int, shared_from: dict[str, bytes] | None = None, keep: float = 0.0
) -> dict[str, bytes]:
    """``n`` files of varied sizes; with ``shared_from``, the first ``keep`` fraction of its
    files are reused unchanged."""
    rnd = random.Random(seed)
    out: dict[str, bytes] = {}
    if shared_from:
        names = sorted(shared_from)[: int(len(shared_from) * keep)]
        out.update({k: shared_from[k] for k in names})
    i = 0
    while len(out) < n:
        size = rnd.choice([100, 4096, 5000, 70_000, 300_000])
        out[f"s{seed}-{i:04d}"] = rnd.randbytes(size)
        i += 1
    return out


@contextlib.contextmanager
def serve_world(work: Path) -> Iterator[World]:
    from tests.nginx import Nginx

    repo = Repository(work / "repo", create=True)
    files = {"app:v1": make_files(1, 40)}
    files["app:v1"]["big"] = random.Random(7).randbytes(3 << 20)
    files["nested/app:v2"] = make_files(2, 41, files["app:v1"], keep=0.9)
    images = {ref: publish(repo, f, ref) for ref, f in files.items()}
    links = work / "links"
    make_linktexts(repo.root, links)
    tls = make_tls(work / "tls")
    ng = Nginx(
        work / "nginx",
        [repo_server(repo.root, links), tls_server(repo.root, tls)],
        ports=("port", "tls"),
    )
    with ng:
        yield World(repo.root, ng, tls, images, files)
