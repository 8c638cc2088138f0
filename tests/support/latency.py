"""A TCP proxy on loopback that adds a round-trip time, for tests and benchmarks.

The kernel here has no netem, so latency comes from this proxy: every byte is passed on half a
round trip after it arrived, in each direction, and a new connection carries its first bytes
only one round trip after it was accepted (the TCP handshake). Each direction also keeps at
most ``window`` bytes unacknowledged, a byte counting until one round trip after it arrived
(as a sender waits for the receiver's ACK), so one connection carries at most ``window / rtt``
bytes per second, like a real TCP connection with that receive window. The default window is
the largest that Linux grows a receive buffer to on its own (the third field of
``net.ipv4.tcp_rmem``: 32 MiB on the project machine's kernel, 6 MiB on older ones);
bandwidth is otherwise loopback's. The bytes carried each way are counted (the bytes "on the
wire" of a benchmark).

It listens on 127.0.0.1 only, forwards only to the one upstream it was given, and is bounded
in time: it runs in a child process (off the caller's GIL) that exits after ``max_seconds``,
when the caller closes it, or when the caller dies (its stdin closes).

    with LatencyProxy(upstream_port, rtt=0.020) as proxy:
        url = f"http://127.0.0.1:{proxy.port}/"

Run directly: ``python -m tests.support.latency --upstream 127.0.0.1:8080 --rtt-ms 20``
(prints the port it listens on, then serves until stdin closes or time is up).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import heapq
import os
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

#: Bytes read from a socket at a time.
_READ = 256 << 10
_REPO = Path(__file__).resolve().parents[2]


def default_window() -> int:
    """The largest receive buffer Linux autotunes to (``tcp_rmem``'s third field)."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        return 6 << 20


class _Direction:
    """Bytes on their way from ``src`` to ``dst``: (due time, data) in arrival order; an
    empty ``data`` is the end of the stream."""

    __slots__ = ("acks", "dst", "eof", "not_before", "queue", "src", "unacked")

    def __init__(self, src: socket.socket, dst: socket.socket, not_before: float) -> None:
        self.src = src
        self.dst = dst
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.acks: collections.deque[tuple[float, int]] = collections.deque()
        self.unacked = 0
        self.eof = False
        self.not_before = not_before


class _Pair:
    __slots__ = ("closed", "down", "up")

    def __init__(self, up: _Direction, down: _Direction) -> None:
        self.up = up
        self.down = down
        self.closed = False


class _Proxy:
    def __init__(self, listen: socket.socket, upstream: tuple[str, int], rtt: float, window: int):
        self.listen = listen
        self.upstream = upstream
        self.half = rtt / 2
        self.rtt = rtt
        self.window = window
        self.sel = selectors.DefaultSelector()
        self.sel.register(listen, selectors.EVENT_READ, None)
        self.timers: list[tuple[float, int, _Direction]] = []
        self.seq = 0
        self.pairs: dict[socket.socket, tuple[_Pair, _Direction]] = {}
        self.bytes_up = 0  # client -> server
        self.bytes_down = 0  # server -> client
        self.connections = 0

    def _accept(self) -> None:
        try:
            client, _ = self.listen.accept()
        except OSError:
            return
        now = time.monotonic()
        try:
            server = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            client.close()  # the upstream refused: so does the proxy
            return
        for s in (client, server):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The request can reach the server only after the handshake's round trip.
        up = _Direction(client, server, now + self.rtt + self.half)
        down = _Direction(server, client, 0.0)
        pair = _Pair(up, down)
        self.connections += 1
        self.pairs[client] = (pair, up)
        self.pairs[server] = (pair, down)
        self.sel.register(client, selectors.EVENT_READ, client)
        self.sel.register(server, selectors.EVENT_READ, server)

    def _close(self, pair: _Pair) -> None:
        if pair.closed:
            return
        pair.closed = True
        for s in (pair.up.src, pair.up.dst):
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(s)
            self.pairs.pop(s, None)
            s.close()

    def _readable(self, s: socket.socket) -> None:
        entry = self.pairs.get(s)
        if entry is None:
            return
        pair, d = entry
        try:
            data = s.recv(_READ)
        except BlockingIOError:
            return
        except OSError:
            self._close(pair)
            return
        now = time.monotonic()
        due = max(now + self.half, d.not_before)
        d.queue.append((due, data))
        if data:
            if d is pair.up:
                self.bytes_up += len(data)
            else:
                self.bytes_down += len(data)
            d.unacked += len(data)
            d.acks.append((now + self.rtt, len(data)))
            self._timer(now + self.rtt, d)
            if d.unacked >= self.window:
                with contextlib.suppress(KeyError, ValueError):
                    self.sel.unregister(s)
        else:
            d.eof = True
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(s)
        self._timer(due, d)

    def _timer(self, when: float, d: _Direction) -> None:
        self.seq += 1
        heapq.heappush(self.timers, (when, self.seq, d))

    def _due(self, d: _Direction, now: float) -> None:
        entry = self.pairs.get(d.src)
        if entry is None:
            return
        pair = entry[0]
        while d.acks and d.acks[0][0] <= now:
            d.unacked -= d.acks.popleft()[1]
        while d.queue and d.queue[0][0] <= now:
            due, data = d.queue[0]
            if not data:
                d.queue.popleft()
                with contextlib.suppress(OSError):
                    d.dst.shutdown(socket.SHUT_WR)
                if pair.up.eof and pair.down.eof and not pair.up.queue and not pair.down.queue:
                    self._close(pair)
                    return
                continue
            try:
                n = d.dst.send(data)
            except BlockingIOError:
                n = 0
            except OSError:
                self._close(pair)
                return
            if n < len(data):
                d.queue[0] = (due, data[n:])
                self._timer(now + 0.001, d)  # the receiver is slow: try again shortly
                break
            d.queue.popleft()
        if not d.eof and d.unacked < self.window and d.src.fileno() >= 0:
            try:
                self.sel.get_key(d.src)
            except KeyError:
                self.sel.register(d.src, selectors.EVENT_READ, d.src)

    def run(self, deadline: float, stdin_fd: int | None) -> None:
        if stdin_fd is not None:
            self.sel.register(stdin_fd, selectors.EVENT_READ, "stdin")
        while True:
            now = time.monotonic()
            if now >= deadline:
                return
            while self.timers and self.timers[0][0] <= now:
                _, _, d = heapq.heappop(self.timers)
                self._due(d, now)
            timeout = deadline - now
            if self.timers:
                timeout = min(timeout, max(0.0, self.timers[0][0] - now))
            for key, _ in self.sel.select(timeout):
                if key.data is None:
                    self._accept()
                elif key.data == "stdin":
                    try:
                        if not os.read(stdin_fd, 4096):  # type: ignore[arg-type]
                            return
                    except OSError as e:
                        if e.errno != errno.EAGAIN:
                            return
                else:
                    self._readable(key.data)


def serve(
    upstream: tuple[str, int],
    rtt: float,
    *,
    window: int | None = None,
    max_seconds: float = 3600.0,
    port: int = 0,
    watch_stdin: bool = True,
) -> None:
    """Run the proxy in this process (prints its port on stdout first)."""
    listen = socket.socket()
    listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listen.bind(("127.0.0.1", port))
    listen.listen(1024)
    listen.setblocking(False)
    print(listen.getsockname()[1], flush=True)
    proxy = _Proxy(listen, upstream, rtt, window or default_window())
    try:
        proxy.run(time.monotonic() + max_seconds, sys.stdin.fileno() if watch_stdin else None)
    finally:
        with contextlib.suppress(OSError):  # nobody reads them any more
            print(f"{proxy.bytes_up} {proxy.bytes_down} {proxy.connections}", flush=True)


class LatencyProxy:
    """The proxy in a child process: ``port`` forwards to ``upstream_port`` with ``rtt``."""

    def __init__(
        self,
        upstream_port: int,
        rtt: float,
        *,
        window: int | None = None,
        max_seconds: float = 1800.0,
        upstream_host: str = "127.0.0.1",
    ) -> None:
        if upstream_host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the latency proxy forwards to loopback only")
        self.upstream = (upstream_host, upstream_port)
        self.rtt = rtt
        self.window = window
        self.max_seconds = max_seconds
        self.port = 0
        #: Bytes carried each way and connections accepted (known once stopped).
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> LatencyProxy:
        cmd = [
            sys.executable,
            "-m",
            "tests.support.latency",
            "--upstream",
            f"{self.upstream[0]}:{self.upstream[1]}",
            "--rtt-ms",
            repr(self.rtt * 1000),
            "--max-seconds",
            repr(self.max_seconds),
        ]
        if self.window is not None:
            cmd += ["--window", str(self.window)]
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=_REPO, env=_env()
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line.strip():
            self.stop()
            raise RuntimeError("the latency proxy did not start")
        self.port = int(line)
        return self

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # the proxy's cue to exit
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            fields = proc.stdout.read().split()
            if len(fields) == 3:
                self.bytes_up, self.bytes_down, self.connections = map(int, fields)
            proc.stdout.close()

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO), env.get("PYTHONPATH")]))
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help="HOST:PORT on loopback")
    ap.add_argument("--rtt-ms", type=float, required=True)
    ap.add_argument("--window", type=int, help="bytes (default: tcp_rmem's maximum)")
    ap.add_argument("--max-seconds", type=float, default=3600.0)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    host, _, port = args.upstream.rpartition(":")
    if host not in ("127.0.0.1", "localhost", "::1"):
        ap.error("the latency proxy forwards to loopback only")
    serve(
        (host, int(port)),
        args.rtt_ms / 1000,
        window=args.window,
        max_seconds=args.max_seconds,
        port=args.port,
    )


if __name__ == "__main__":
    main()
