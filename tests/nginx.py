"""A real nginx on 127.0.0.1, started and stopped by tests and benchmarks.

:class:`Nginx` writes a self-contained configuration under a work directory (pid file, logs and
temp paths all inside it), starts ``nginx -g 'daemon off;'`` in the foreground and waits until
every port accepts connections. Server blocks are given as text with ``{port}`` placeholders
resolved to free loopback ports. The access log records ``uri status bytes`` per line so tests can
count requests at the server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path
from types import TracebackType

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)

_MAIN = """\
{user}
worker_processes {workers};
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    default_type application/octet-stream;
    types {{ }}
    log_format counting '$request_uri $status $body_bytes_sent';
    access_log {work}/access.log counting;
    client_body_temp_path {work}/tmp/body;
    proxy_temp_path {work}/tmp/proxy;
    fastcgi_temp_path {work}/tmp/fastcgi;
    uwsgi_temp_path {work}/tmp/uwsgi;
    scgi_temp_path {work}/tmp/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
{servers}
}}
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Nginx:
    """One nginx instance. Use as a context manager, or call :meth:`start` / :meth:`stop`.

    ``servers`` are ``server { ... }`` blocks; each ``{name}`` placeholder for a name in ``ports``
    is replaced (plain text substitution) by a free port, available afterwards in :attr:`ports`.
    """

    def __init__(
        self,
        work: Path,
        servers: list[str],
        *,
        ports: tuple[str, ...] = ("port",),
        workers: int = 1,
        access_log: bool = True,
    ) -> None:
        if NGINX is None:
            raise RuntimeError("nginx is not installed (scripts/setup.sh installs it)")
        self.work = work
        self.ports = {name: free_port() for name in ports}
        self._servers = []
        for text in servers:
            for name, number in self.ports.items():
                text = text.replace("{" + name + "}", str(number))
            self._servers.append(text)
        self._workers = workers
        self._access_log = access_log
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return self.ports["port"]

    @property
    def access_log(self) -> Path:
        return self.work / "access.log"

    def start(self) -> Nginx:
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "tmp").mkdir(exist_ok=True)
        user = "user root;" if os.geteuid() == 0 else ""
        conf = _MAIN.format(
            user=user,
            workers=self._workers,
            work=self.work,
            servers="\n".join(self._servers),
        )
        if not self._access_log:
            conf = conf.replace(f"access_log {self.work}/access.log counting;", "access_log off;")
        (self.work / "nginx.conf").write_text(conf)
        self._proc = subprocess.Popen(
            [
                str(NGINX),
                "-p",
                str(self.work),
                "-c",
                str(self.work / "nginx.conf"),
                "-g",
                "daemon off;",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        pending = set(self.ports.values())
        while pending:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                log = (
                    (self.work / "error.log").read_text()
                    if (self.work / "error.log").exists()
                    else ""
                )
                raise RuntimeError(f"nginx exited: {err}{log}")
            for p in list(pending):
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", p), 0.2):
                    pending.discard(p)
            if pending:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"nginx did not listen on {sorted(pending)}")
                time.sleep(0.02)
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def requests(self) -> list[tuple[str, int, int]]:
        """(uri, status, body bytes sent) for every request logged so far.

        nginx logs a request after sending its response, so a client can be answered before
        the line is written: the log is read once it has stopped growing for 20 ms.
        """
        out: list[tuple[str, int, int]] = []
        if not self.access_log.exists():
            return out
        size = -1
        while size != (size := self.access_log.stat().st_size):
            time.sleep(0.02)
        for line in self.access_log.read_text().splitlines():
            uri, status, size = line.rsplit(" ", 2)
            out.append((uri, int(status), int(size)))
        return out

    def request_counts(self, prefix: str = "") -> Counter[str]:
        """How many times each URI starting with ``prefix`` was requested (any status)."""
        return Counter(uri for uri, _, _ in self.requests() if uri.startswith(prefix))

    def clear_log(self) -> None:
        """Forget logged requests (nginx keeps appending to the same open file)."""
        if self.access_log.exists():
            with open(self.access_log, "r+b") as f:
                f.truncate(0)


def static_server(root: Path, port: str = "{port}", extra: str = "") -> str:
    """A server block serving ``root`` as a static repository on 127.0.0.1."""
    return f"""
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
        {extra}
    }}"""
