"""Helpers for the OCI import tests: images made with umoci and copied with skopeo, Debian's
``docker-registry`` started on loopback (optionally with TLS + htpasswd or with token auth,
whose token service is :class:`TokenServer` below), pushes with the distribution API, and a
look at a repository's files. Layer tars and layouts: :mod:`tests.ocilayers`."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.nginx import free_port
from tests.ocilayers import sha256_hex

TOOLS = ("docker-registry", "umoci", "skopeo")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def tools_missing(*names: str) -> str | None:
    """None if every tool is installed, else why the test cannot run (for pytest.skip)."""
    for name in names or TOOLS:
        if shutil.which(name) is None:
            return f"{name} is not installed (scripts/setup.sh installs it)"
    return None


def run(*args: str | Path, cwd: Path | None = None, input: bytes | None = None) -> str:
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, input=input, capture_output=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, args))} failed ({proc.returncode}):\n"
            f"{proc.stdout.decode(errors='replace')}{proc.stderr.decode(errors='replace')}"
        )
    return proc.stdout.decode(errors="replace")


# -- umoci and skopeo ----------------------------------------------------------------------------


def umoci_image(layout: Path, tag: str, layers: list[bytes], work: Path) -> None:
    """An OCI layout image ``layout:tag`` made of ``layers`` (uncompressed tars, lowest first)
    with ``umoci raw add-layer`` (which gzips them)."""
    if not (layout / "oci-layout").exists():
        run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:{tag}")
    for i, data in enumerate(layers):
        path = work / f"{tag}-layer{i}.tar"
        path.write_bytes(data)
        run("umoci", "raw", "add-layer", "--image", f"{layout}:{tag}", path)
        path.unlink()


def umoci_unpack(layout: Path, tag: str, dest: Path) -> Path:
    """``umoci raw unpack`` of ``layout:tag`` into ``dest`` (the reference tree)."""
    run("umoci", "raw", "unpack", "--image", f"{layout}:{tag}", dest)
    return dest


def skopeo_copy(src: str, dst: str, *extra: str) -> None:
    run("skopeo", "copy", "-q", "--insecure-policy", *extra, src, dst)


# -- docker-registry -----------------------------------------------------------------------------


@dataclass
class Registry:
    host: str  # 127.0.0.1:port
    proc: subprocess.Popen[bytes]
    root: Path
    tls: bool

    def push(self, src: str, name: str, *extra: str) -> str:
        """Copy ``src`` (a skopeo source) into the registry as ``name``; the docker:// ref."""
        ref = f"docker://{self.host}/{name}"
        skopeo_copy(src, ref, "--dest-tls-verify=false", *extra)
        return ref


def wait_port(host: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    h, _, p = host.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {log.read_text(errors='replace')}")
        with contextlib.suppress(OSError), socket.create_connection((h, int(p)), timeout=1):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"docker-registry did not listen on {host}")
        time.sleep(0.05)


@contextlib.contextmanager
def registry(
    work: Path,
    *,
    tls: tuple[Path, Path] | None = None,
    htpasswd: Path | None = None,
    token: dict[str, str] | None = None,
) -> Iterator[Registry]:
    """Debian's docker-registry on 127.0.0.1 (filesystem storage under ``work``)."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    host = f"127.0.0.1:{port}"
    cfg: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(work / "data")},
            "delete": {"enabled": True},
        },
        "http": {"addr": host, "secret": secrets.token_hex(16)},
        "health": {"storagedriver": {"enabled": False}},
    }
    if tls is not None:
        cfg["http"]["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
    if htpasswd is not None:
        cfg["auth"] = {"htpasswd": {"realm": "test-registry", "path": str(htpasswd)}}
    if token is not None:
        cfg["auth"] = {"token": token}
    config = work / "config.yml"
    config.write_text(json.dumps(cfg))  # YAML is a superset of JSON
    log = work / "registry.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            ["docker-registry", "serve", str(config)], stdout=logf, stderr=subprocess.STDOUT
        )
    try:
        wait_port(host, proc, log)
        yield Registry(host, proc, work, tls is not None)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def htpasswd_file(path: Path, user: str, password: str) -> Path:
    path.write_text(run("htpasswd", "-Bbn", user, password))
    return path


# -- a token service for docker-registry's token auth ------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """The token service of the distribution token auth spec: checks Basic credentials and
    hands out RS256 JWTs (signed with the openssl CLI) that docker-registry verifies against
    ``cert`` (configured as its ``rootcertbundle``; the cert also goes in the ``x5c`` header)."""

    ISSUER = "composefs-csi-test-issuer"
    SERVICE = "composefs-csi-test-registry"

    def __init__(self, work: Path, user: str, password: str) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.key = work / "token.key"
        self.cert = work / "token.pem"
        run(
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", self.key,
            "-out", self.cert, "-days", "2", "-subj", "/CN=composefs-csi test token signer",
        )  # fmt: skip
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
            capture_output=True,
            check=True,
        ).stdout
        self._x5c = base64.b64encode(der).decode()
        self.user, self.password = user, password
        self.requests: list[dict[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server._handle(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._httpd.server_address[1]
        self.realm = f"http://127.0.0.1:{self.port}/token"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def registry_config(self) -> dict[str, str]:
        return {
            "realm": self.realm,
            "service": self.SERVICE,
            "issuer": self.ISSUER,
            "rootcertbundle": str(self.cert),
        }

    def _sign(self, payload: bytes) -> bytes:
        return subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=payload,
            capture_output=True,
            check=True,
        ).stdout

    def token(self, subject: str, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {
            "iss": self.ISSUER,
            "sub": subject,
            "aud": self.SERVICE,
            "exp": now + 600,
            "nbf": now - 60,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        return f"{signing}.{_b64(self._sign(signing.encode()))}"

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(h.path)
        query = urllib.parse.parse_qs(url.query)
        auth = h.headers.get("Authorization", "")
        self.requests.append({"path": url.path, "authorization": auth})
        want = "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        if url.path != "/token" or auth != want:
            h.send_response(401)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        body = json.dumps({"token": self.token(self.user, query.get("scope", []))}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def __enter__(self) -> TokenServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


# -- looking at a repository -----------------------------------------------------------------------


def repo_files(root: Path) -> set[str]:
    """Every file and symlink under a repository (relative), the temp area's lock files and
    the owner files of live processes (this one's) aside."""
    out = set()
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), root)
            if rel.startswith((".tmp/locks/", ".tmp/owners/")):
                continue
            out.add(rel)
    return out


def http_get(host: str, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def push_blobs_and_manifest(
    host: str, name: str, tag: str, blobs: list[bytes], manifest: dict[str, Any]
) -> str:
    """Push ``blobs`` and ``manifest`` with the distribution API (what ORAS does for an
    artifact); the ``docker://`` reference."""
    for data in blobs:
        status, _ = http_get(host, f"/v2/{name}/blobs/sha256:{sha256_hex(data)}")
        if status == 200:
            continue
        conn = http.client.HTTPConnection(host, timeout=30)
        conn.request("POST", f"/v2/{name}/blobs/uploads/", headers={"Content-Length": "0"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 202, resp.status
        location = resp.headers["Location"]
        url = urllib.parse.urlsplit(location)
        sep = "&" if url.query else "?"
        target = f"{url.path}?{url.query}{sep}" if url.query else f"{url.path}?"
        conn.request(
            "PUT",
            f"{target}digest=sha256:{sha256_hex(data)}",
            body=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 201, (resp.status, sep)
        conn.close()
    body = json.dumps(manifest).encode()
    conn = http.client.HTTPConnection(host, timeout=30)
    conn.request(
        "PUT", f"/v2/{name}/manifests/{tag}", body=body,
        headers={"Content-Type": manifest["mediaType"]},
    )  # fmt: skip
    resp = conn.getresponse()
    detail = resp.read()
    conn.close()
    assert resp.status == 201, (resp.status, detail)
    return f"docker://{host}/{name}:{tag}"
