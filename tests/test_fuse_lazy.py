"""Lazy views against a slow repository: listable at once, reads wait only for their own
object, everything ends verified in the store, failures are errors and never hangs.

The repository server holds each object back until the test opens its gate, so "slow" is
decided by the test, not by the clock.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from csi.image.fsverity import digest_file
from csi.image.tree import S_IFDIR, Node, Tree
from csi.repo import Repository
from tests.fuse_helpers import (
    add_objects,
    external,
    free_port,
    fuse_unavailable,
    metric_values,
    run_daemon,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]


@pytest.fixture(autouse=True)
def _facilities() -> None:
    reason = fuse_unavailable()
    if reason:
        pytest.skip(reason)


class GatedRepo:
    """Serves a repository directory; ``objects/...`` requests wait for their gate."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.gates: dict[str, threading.Event] = {}
        self.missing: set[str] = set()
        #: Paths answered with an endless body (no length: it ends when the client hangs up).
        self.endless: set[str] = set()
        self.endless_sent = 0
        self.requests: list[str] = []
        self._mu = threading.Lock()
        self.closing = threading.Event()

    def gate(self, digest: bytes) -> threading.Event:
        h = digest.hex()
        with self._mu:
            return self.gates.setdefault(f"/objects/{h[:2]}/{h[2:]}", threading.Event())

    def open_all(self) -> None:
        self.closing.set()
        with self._mu:
            for g in self.gates.values():
                g.set()

    @contextlib.contextmanager
    def serving(self) -> Iterator[str]:
        repo = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                with repo._mu:
                    repo.requests.append(path)
                    gate = repo.gates.get(path)
                if gate is not None:
                    gate.wait()
                if path in repo.endless:
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    block = b"x" * 65536
                    with contextlib.suppress(OSError):  # at most 64 MiB, so old code fails
                        while not repo.closing.is_set() and repo.endless_sent < 64 << 20:
                            self.wfile.write(block)
                            with repo._mu:
                                repo.endless_sent += len(block)
                    self.close_connection = True
                    return
                p = repo.root / path.lstrip("/")
                if path in repo.missing or ".." in path or not p.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = p.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        t = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        t.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/"
        finally:
            self.open_all()
            server.shutdown()
            server.server_close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[GatedRepo, str, Path, bytes, dict[str, bytes]]]:
    repo = Repository(tmp_path / "repo", create=True)
    tree = Tree(Node(mode=S_IFDIR | 0o755))
    assert tree.root.entries is not None
    files = {f"f{i}": os.urandom(5000 + i * 777) for i in range(12)}
    sub = Node(mode=S_IFDIR | 0o755)
    tree.root.add(b"sub", sub)
    for name, data in files.items():
        node, _ = external(data)
        repo.add_object_bytes(data)
        (sub if name.endswith("0") else tree.root).add(name.encode(), node)
    from csi.image.writer import write_image

    image = write_image(tree)
    digest = repo.add_image(image)
    store = tmp_path / "store"
    from csi.store import Store

    with Store(store) as s:
        s.add_image_bytes(image)  # only the image is local
    gated = GatedRepo(repo.root)
    with gated.serving() as url:
        yield gated, url, store, digest, files


def _read_in_thread(path: Path) -> tuple[threading.Thread, dict[str, object]]:
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["data"] = path.read_bytes()
        except OSError as e:
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_lazy_view_reads_wait_only_for_their_own_object(world: tuple) -> None:  # type: ignore[type-arg]
    gated, url, store, digest, files = world
    from csi.image.fsverity import digest_bytes

    for data in files.values():
        gated.gate(digest_bytes(data))  # every object held back
    with run_daemon(
        store, repositories={"main": {"urls": [url], "allow_plain_http": True}}, prefetch_threads=2
    ) as d:
        view = Path(d.client.add_view([digest], "pod-a", lazy=True, repository="main")["path"])
        # Listable and stat-able at once: nothing of the objects is needed.
        assert sorted(os.listdir(view)) == sorted(
            [n for n in files if not n.endswith("0")] + ["sub"]
        )
        assert os.stat(view / "f3").st_size == len(files["f3"])
        # A read of f1 blocks while its object is held back...
        t1, out1 = _read_in_thread(view / "f1")
        # ...and a read of f2 completes as soon as f2's own object is let through.
        gated.gate(digest_bytes(files["f2"])).set()
        assert (view / "f2").read_bytes() == files["f2"]
        assert t1.is_alive() and not out1
        gated.gate(digest_bytes(files["f1"])).set()
        t1.join(60)
        assert out1.get("data") == files["f1"]
        # Let everything through: the background prefetch completes the view.
        gated.open_all()
        for _ in range(600):
            st = d.client.status(objects=True)["views"][0]
            if st["progress"]["state"] == "done":
                break
            threading.Event().wait(0.05)
        assert st["progress"]["state"] == "done", (st, d.log.read_text()[-4000:])
        assert st["missing"] == 0
        for name, data in files.items():
            p = view / ("sub/" + name if name.endswith("0") else name)
            assert p.read_bytes() == data
    # Every object in the store hashes to its name (verified on the way in).
    objs = list((store / "objects").glob("*/*"))
    assert len(objs) == len(files) + 1  # the objects and the image
    for p in objs:
        assert digest_file(p).hex() == p.parent.name + p.name
    # Each object was downloaded once despite demand reads racing the prefetch.
    obj_requests = [r for r in gated.requests if r.startswith("/objects/")]
    assert len(obj_requests) == len(set(obj_requests)) == len(files)


def test_failed_lazy_fetch_is_eio_not_a_hang(world: tuple) -> None:  # type: ignore[type-arg]
    gated, url, store, digest, files = world
    from csi.image.fsverity import digest_bytes

    h = digest_bytes(files["f5"]).hex()
    gated.missing.add(f"/objects/{h[:2]}/{h[2:]}")
    with run_daemon(store, repositories={"main": {"urls": [url], "allow_plain_http": True}}) as d:
        view = Path(d.client.add_view([digest], "pod-a", lazy=True)["path"])
        with pytest.raises(OSError) as e:
            (view / "f5").read_bytes()
        assert e.value.errno == errno.EIO
        assert (view / "f4").read_bytes() == files["f4"]
        # The daemon logs the object it could not fetch (possibly just after replying EIO).
        deadline = time.monotonic() + 10
        while h not in d.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert h in d.log.read_text()


def test_lazy_download_stops_at_the_size_the_image_records(world: tuple) -> None:  # type: ignore[type-arg]
    """A server that never stops sending an object cannot fill the node's disk: the download
    is cut off at the object's size, the read fails, nothing is stored for it."""
    gated, url, store, digest, files = world
    from csi.image.fsverity import digest_bytes

    h = digest_bytes(files["f5"]).hex()
    gated.endless.add(f"/objects/{h[:2]}/{h[2:]}")
    repo = {"urls": [url], "allow_plain_http": True, "retries": {"max_attempts": 2}}
    with run_daemon(store, repositories={"main": repo}) as d:
        view = Path(d.client.add_view([digest], "pod-a", lazy=True)["path"])
        with pytest.raises(OSError) as e:
            (view / "f5").read_bytes()
        assert e.value.errno == errno.EIO
        assert (view / "f4").read_bytes() == files["f4"]
    assert not (store / "objects" / h[:2] / h[2:]).exists()
    # Two attempts of a 8887-byte object: a few socket buffers were sent, not gigabytes.
    assert gated.endless_sent < 32 << 20, gated.endless_sent
    leftovers = [p for p in (store / "tmp").rglob("*") if p.is_file()]
    assert not leftovers, leftovers


def test_eager_view_of_missing_objects_is_enoent(world: tuple) -> None:  # type: ignore[type-arg]
    _gated, url, store, digest, files = world
    with run_daemon(store, repositories={"main": {"urls": [url], "allow_plain_http": True}}) as d:
        view = Path(d.client.add_view([digest], "pod-a")["path"])
        with pytest.raises(FileNotFoundError):
            (view / "f4").read_bytes()
        # Upgrading the same view to lazy (another holder) starts fetching.
        d.client.add_view([digest], "pod-b", lazy=True)
        assert (view / "f4").read_bytes() == files["f4"]


def test_lazy_read_that_failed_reads_right_once_the_object_arrives(world: tuple) -> None:  # type: ignore[type-arg]
    """Nothing of a failed read stays cached in the kernel: once the object can be fetched,
    the same file reads right (through the descriptor that failed, and a new one)."""
    gated, url, store, digest, files = world
    from csi.image.fsverity import digest_bytes

    h = digest_bytes(files["f6"]).hex()
    gated.missing.add(f"/objects/{h[:2]}/{h[2:]}")
    with run_daemon(store, repositories={"main": {"urls": [url], "allow_plain_http": True}}) as d:
        view = Path(d.client.add_view([digest], "pod-a", lazy=True)["path"])
        with open(view / "f6", "rb") as f:
            with pytest.raises(OSError) as e:
                f.read()
            assert e.value.errno == errno.EIO
            assert os.fstat(f.fileno()).st_size == len(files["f6"])
            gated.missing.discard(f"/objects/{h[:2]}/{h[2:]}")
            f.seek(0)
            assert f.read() == files["f6"]
        assert (view / "f6").read_bytes() == files["f6"]
        assert os.stat(view / "f6").st_size == len(files["f6"])


def test_file_opened_before_its_object_exists_reads_it_when_it_arrives(world: tuple) -> None:  # type: ignore[type-arg]
    gated, url, store, digest, files = world
    from csi.image.fsverity import digest_bytes

    gate = gated.gate(digest_bytes(files["f7"]))
    with run_daemon(store, repositories={"main": {"urls": [url], "allow_plain_http": True}}) as d:
        view = Path(d.client.add_view([digest], "pod-a", lazy=True)["path"])
        fd = os.open(view / "f7", os.O_RDONLY)
        try:
            out: dict[str, object] = {}

            def read() -> None:
                try:
                    out["data"] = os.pread(fd, 1 << 20, 0)
                except OSError as e:
                    out["error"] = e

            t = threading.Thread(target=read, daemon=True)
            t.start()
            assert (view / "f8").read_bytes() == files["f8"]  # other files are not held up
            assert t.is_alive() and not out
            gate.set()
            t.join(60)
            assert out.get("data") == files["f7"]
            assert os.pread(fd, 100, 5) == files["f7"][5:105]
        finally:
            os.close(fd)
        assert (view / "f7").read_bytes() == files["f7"]


def test_many_waiting_lazy_reads_do_not_hold_up_local_files(tmp_path: Path) -> None:
    """More lazy reads wait than the kernel lets run in the background by default (12): a
    read of a file whose object is local still completes at once."""
    from csi.image.fsverity import digest_bytes
    from csi.image.writer import write_image
    from csi.store import Store

    repo = Repository(tmp_path / "repo", create=True)
    tree = Tree(Node(mode=S_IFDIR | 0o755))
    assert tree.root.entries is not None
    files = {f"lazy{i}": os.urandom(20_000 + i) for i in range(24)}
    files["local"] = os.urandom(30_000)
    for name, data in files.items():
        node, _ = external(data)
        repo.add_object_bytes(data)
        tree.root.add(name.encode(), node)
    image = write_image(tree)
    digest = repo.add_image(image)
    store = tmp_path / "store"
    with Store(store) as s:
        s.add_image_bytes(image)
    add_objects(store, [files["local"]])
    gated = GatedRepo(repo.root)
    for name, data in files.items():
        if name != "local":
            gated.gate(digest_bytes(data))
    with (
        gated.serving() as url,
        run_daemon(
            store,
            repositories={"main": {"urls": [url], "allow_plain_http": True}},
            prefetch_threads=1,
        ) as d,
    ):
        view = Path(d.client.add_view([digest], "pod-a", lazy=True)["path"])
        waiting = [_read_in_thread(view / n) for n in files if n != "local"]
        deadline = time.monotonic() + 30
        while len([r for r in gated.requests if r.startswith("/objects/")]) < 16:
            assert time.monotonic() < deadline, gated.requests
            time.sleep(0.05)
        local, out = _read_in_thread(view / "local")
        local.join(60)
        assert out.get("data") == files["local"], d.log.read_text()[-3000:]
        assert all(t.is_alive() and not o for t, o in waiting)
        gated.open_all()
        for (t, o), name in zip(waiting, [n for n in files if n != "local"], strict=True):
            t.join(60)
            assert o.get("data") == files[name]


def test_read_ahead_stores_local_objects_and_leaves_missing_ones_to_their_reads(
    world: tuple,  # type: ignore[type-arg]
) -> None:
    """Reading a directory in turn stores the next files' contents in the page cache only for
    objects already in the store: one not yet fetched is neither fetched nor cached by the
    read-ahead, so its own read waits for it and gets the verified bytes (nothing stale)."""
    gated, url, store, digest, files = world
    from csi.image.fsverity import digest_bytes

    for data in files.values():
        gated.gate(digest_bytes(data))
    local = ["f2", "f3", "f5"]
    add_objects(store, [files[n] for n in local])
    port = free_port()
    with run_daemon(
        store,
        repositories={"main": {"urls": [url], "allow_plain_http": True}},
        prefetch_threads=1,
        metrics_address=f"127.0.0.1:{port}",
    ) as d:
        view = Path(d.client.add_view([digest], "pod-a", lazy=True, repository="main")["path"])
        names = os.listdir(view)
        assert names[:5] == ["f1", "f11", "f2", "f3", "f4"]  # the listing, as read
        # f1 is the first of the listing: read-ahead starts with its read.
        gated.gate(digest_bytes(files["f1"])).set()
        assert (view / "f1").read_bytes() == files["f1"]
        stored = "composefs_csi_fuse_readahead_stored_bytes_total"
        deadline = time.monotonic() + 10
        want = sum(len(files[n]) for n in local)
        while metric_values(port, stored)[""] < want and time.monotonic() < deadline:
            time.sleep(0.02)
        assert metric_values(port, stored)[""] == want
        reads = "composefs_csi_fuse_operations_total"
        before = metric_values(port, reads)['op="read"']
        for n in local:
            assert (view / n).read_bytes() == files[n]
        assert metric_values(port, reads)['op="read"'] == before  # from the page cache
        # f4's object is still held back: its read waits for it, then gets its own bytes.
        t, out = _read_in_thread(view / "f4")
        t.join(0.5)
        assert t.is_alive() and not out
        gated.gate(digest_bytes(files["f4"])).set()
        t.join(60)
        assert out.get("data") == files["f4"]
        gated.open_all()
        for name, data in files.items():
            assert (view / ("sub/" + name if name.endswith("0") else name)).read_bytes() == data
