"""Compare HTTP client libraries for repository fetching, against nginx on loopback.

    python -m bench.http_clients [--small 2000] [--large-mib 256] [--threads 16] [--runs 3]

Workloads: N x 4 KiB objects fetched with ``--threads`` concurrent transfers, and one large object.
Each is measured raw (body discarded) and "into the store" (fs-verity hashing plus writing a temp
file, as :mod:`csi.fetch` does). Clients that are not installed are skipped; install candidates into
a scratch venv (``pip install pycurl urllib3``) to run the full comparison.
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from csi.image.fsverity import FsVerityHasher
from tests.nginx import Nginx, static_server

CHUNK = 1 << 20


class Sink:
    """Where a body goes: discarded, or hashed and written to a temp file like the store does."""

    def __init__(self, store_dir: Path | None) -> None:
        self.store_dir = store_dir
        self.hasher = FsVerityHasher() if store_dir else None
        self.f: Any = None
        if store_dir is not None:
            self.f = tempfile.NamedTemporaryFile(dir=store_dir, delete=False)  # noqa: SIM115
        self.n = 0

    def write(self, data: bytes) -> None:
        self.n += len(data)
        if self.hasher is not None:
            self.hasher.update(data)
            self.f.write(data)

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.hasher.digest()  # type: ignore[union-attr]
            os.unlink(self.f.name)


def urllib3_many(urls: list[str], threads: int, store: Path | None) -> None:
    import urllib3

    pool = urllib3.PoolManager(maxsize=threads)

    def one(url: str) -> None:
        sink = Sink(store)
        r = pool.request("GET", url, preload_content=False)
        while True:
            b = r.read(CHUNK)
            if not b:
                break
            sink.write(b)
        r.release_conn()
        sink.close()

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(one, urls))


def pycurl_threads(urls: list[str], threads: int, store: Path | None) -> None:
    import pycurl

    local = threading.local()

    def one(url: str) -> None:
        c = getattr(local, "c", None)
        if c is None:
            c = local.c = pycurl.Curl()
            c.setopt(pycurl.BUFFERSIZE, CHUNK)
        sink = Sink(store)
        c.setopt(pycurl.URL, url)
        c.setopt(pycurl.WRITEFUNCTION, sink.write)
        c.perform()
        sink.close()

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(one, urls))


def pycurl_multi(urls: list[str], threads: int, store: Path | None) -> None:
    import pycurl

    m = pycurl.CurlMulti()
    free = [pycurl.Curl() for _ in range(threads)]
    for c in free:
        c.setopt(pycurl.BUFFERSIZE, CHUNK)
    todo = list(reversed(urls))
    active = 0
    sinks: dict[Any, Sink] = {}
    while todo or active:
        while todo and free:
            c = free.pop()
            s = Sink(store)
            sinks[c] = s
            c.setopt(pycurl.URL, todo.pop())
            c.setopt(pycurl.WRITEFUNCTION, s.write)
            m.add_handle(c)
            active += 1
        while m.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
            pass
        _, ok, failed = m.info_read()
        for c in ok:
            m.remove_handle(c)
            sinks.pop(c).close()
            free.append(c)
            active -= 1
        for _c, _, msg in failed:
            raise RuntimeError(msg)
        if active and not ok:
            m.select(1.0)


def pycurl_multi_handoff(urls: list[str], threads: int, store: Path | None) -> None:
    """CurlMulti in one loop thread; callers in worker threads wait for their transfer (the shape
    needed to fit a blocking ``store.ensure(fill)`` callback)."""
    import pycurl

    q: queue.Queue[tuple[str, Sink, threading.Event]] = queue.Queue()
    stop = threading.Event()

    def loop() -> None:
        m = pycurl.CurlMulti()
        free = [pycurl.Curl() for _ in range(threads)]
        for c in free:
            c.setopt(pycurl.BUFFERSIZE, CHUNK)
        owners: dict[Any, threading.Event] = {}
        while not stop.is_set() or owners:
            while free:
                try:
                    url, sink, ev = q.get(block=not owners, timeout=0.05)
                except queue.Empty:
                    break
                c = free.pop()
                c.setopt(pycurl.URL, url)
                c.setopt(pycurl.WRITEFUNCTION, sink.write)
                owners[c] = ev
                m.add_handle(c)
            while m.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
                pass
            _, ok, failed = m.info_read()
            for c in ok:
                m.remove_handle(c)
                owners.pop(c).set()
                free.append(c)
            for _c, _, msg in failed:
                raise RuntimeError(msg)
            if owners and not ok:
                m.select(0.01)

    t = threading.Thread(target=loop, daemon=True)
    t.start()

    def one(url: str) -> None:
        sink = Sink(store)
        ev = threading.Event()
        q.put((url, sink, ev))
        ev.wait()
        sink.close()

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(one, urls))
    stop.set()
    t.join()


CLIENTS: dict[str, Callable[[list[str], int, Path | None], None]] = {
    "urllib3 + threads": urllib3_many,
    "pycurl easy per thread": pycurl_threads,
    "pycurl CurlMulti": pycurl_multi,
    "pycurl CurlMulti + handoff": pycurl_multi_handoff,
}


def available(name: str) -> bool:
    mod = "urllib3" if name.startswith("urllib3") else "pycurl"
    try:
        __import__(mod)
    except ImportError:
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=2000, help="number of 4 KiB objects")
    ap.add_argument("--large-mib", type=int, default=256, help="size of the large object")
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="httpbench-") as tmp:
        root = Path(tmp) / "www"
        (root / "s").mkdir(parents=True)
        for i in range(args.small):
            (root / "s" / f"{i:06d}").write_bytes(os.urandom(4096))
        with open(root / "large", "wb") as f:
            for _ in range(args.large_mib):
                f.write(os.urandom(1 << 20))
        store = Path(tmp) / "store"
        store.mkdir()
        with Nginx(Path(tmp) / "nginx", [static_server(root)], access_log=False) as ng:
            base = f"http://127.0.0.1:{ng.port}"
            small = [f"{base}/s/{i:06d}" for i in range(args.small)]
            print(f"{'client':32} {'mode':6} {'4KiB req/s':>11} {'large MB/s':>11}")
            for name, fn in CLIENTS.items():
                if not available(name):
                    print(f"{name:32} (not installed)")
                    continue
                for mode, sdir in (("raw", None), ("store", store)):
                    rates, tputs = [], []
                    for _ in range(args.runs):
                        t0 = time.perf_counter()
                        fn(small, args.threads, sdir)
                        rates.append(len(small) / (time.perf_counter() - t0))
                        t0 = time.perf_counter()
                        fn([f"{base}/large"], 1, sdir)
                        tputs.append(args.large_mib * 1.048576 / (time.perf_counter() - t0))
                    print(
                        f"{name:32} {mode:6} {statistics.median(rates):11.0f} "
                        f"{statistics.median(tputs):11.0f}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
