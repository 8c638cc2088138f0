"""Data plane pieces that need no mount: inode numbers, the descriptor cache, the control
protocol and its client, and the view logic (image and composition) over in-memory images."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import threading
from pathlib import Path

import pytest
import trio

from csi.fuse.client import DataPlaneClient, DataPlaneError
from csi.fuse.control import ControlError, serve_connection
from csi.fuse.daemon import view_key
from csi.fuse.fs import DataPlaneFS, kernel_opens_supported
from csi.fuse.inodes import MAX_SLOT, NID_MASK, make_ino, split_ino
from csi.fuse.objects import FdCache
from csi.fuse.views import CompositionView, ImageView, ListingCache, ViewError
from csi.image.reader import Image
from csi.image.tree import S_IFCHR, S_IFDIR, S_IFREG, Node, Tree
from csi.image.writer import write_image


def test_inode_numbers_round_trip_and_never_collide() -> None:
    seen = set()
    for slot in (0, 1, 2, MAX_SLOT):
        for layer in (0, 1, 255):
            for nid in (36, 37, NID_MASK):
                ino = make_ino(slot, layer, nid)
                assert split_ino(ino) == (slot, layer, nid)
                assert ino & NID_MASK == nid
                assert 0 < ino < 1 << 63
                seen.add(ino)
    assert len(seen) == 4 * 3 * 3
    with pytest.raises(ValueError):
        make_ino(1, 0, NID_MASK + 1)
    with pytest.raises(ValueError):
        make_ino(MAX_SLOT + 1, 0, 36)


def test_view_keys() -> None:
    a, b = b"\x01" * 32, b"\x02" * 32
    assert view_key([a], False) == a.hex()
    assert view_key([a, b], True).startswith("c-")
    assert view_key([a, b], True) != view_key([b, a], True)
    assert view_key([a], True) != view_key([a], False)


def test_fd_cache_bounds_idle_descriptors_and_never_closes_used_ones(tmp_path: Path) -> None:
    cache = FdCache(max_idle=2)
    files = []
    for i in range(4):
        p = tmp_path / f"o{i}"
        p.write_bytes(b"x")
        files.append(cache.insert(bytes([i]) * 32, os.open(p, os.O_RDONLY)))
    assert len(cache) == 4
    for f in files:
        cache.release(f)
    assert len(cache) == 2  # the two least recently released were closed
    with pytest.raises(OSError):
        os.fstat(files[0].fd)
    again = cache.acquire(bytes([3]) * 32)
    assert again is files[3]
    cache.close_all()
    os.fstat(again.fd)  # still in use: kept until released
    cache.release(again)
    with pytest.raises(OSError):
        os.fstat(again.fd)


def test_fd_cache_race_keeps_one_descriptor(tmp_path: Path) -> None:
    p = tmp_path / "o"
    p.write_bytes(b"x")
    cache = FdCache(4)
    a = cache.insert(b"k" * 32, os.open(p, os.O_RDONLY))
    second = os.open(p, os.O_RDONLY)
    b = cache.insert(b"k" * 32, second)
    assert a is b and a.refs == 2
    with pytest.raises(OSError):
        os.fstat(second)


def _serve_once(sock_path: Path, handlers: dict) -> threading.Thread:  # type: ignore[type-arg]
    ready = threading.Event()

    async def main() -> None:
        listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await listener.bind(str(sock_path))
        listener.listen(4)
        ready.set()
        conn, _ = await listener.accept()
        await serve_connection(trio.SocketStream(conn), handlers)
        listener.close()

    t = threading.Thread(target=trio.run, args=(main,), daemon=True)
    t.start()
    ready.wait(10)
    return t


def test_control_protocol_round_trip(tmp_path: Path) -> None:
    async def echo(req: dict) -> dict:  # type: ignore[type-arg]
        return {"got": req}

    async def fail(req: dict) -> None:  # type: ignore[type-arg]
        raise ControlError("not_found", "no such image")

    sock = tmp_path / "c.sock"
    t = _serve_once(sock, {"ping": echo, "add_view": fail})
    client = DataPlaneClient(sock)
    assert client.call("ping", x=1) == {"got": {"x": 1}}
    t.join(10)
    t = _serve_once(sock.with_name("d.sock"), {"add_view": fail})
    with pytest.raises(DataPlaneError) as e:
        DataPlaneClient(sock.with_name("d.sock")).add_view([b"\0" * 32], "h")
    assert e.value.code == "not_found" and "no such image" in str(e.value)
    t.join(10)
    t = _serve_once(sock.with_name("e.sock"), {})
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.connect(str(sock.with_name("e.sock")))
    s.sendall(b"not json\n" + json.dumps({"op": "nope"}).encode() + b"\n")
    replies = b""
    while replies.count(b"\n") < 2:
        replies += s.recv(4096)
    s.close()
    first, second = (json.loads(x) for x in replies.splitlines())
    assert first["error"]["code"] == "invalid_argument"
    assert second["error"]["code"] == "invalid_argument" and "nope" in second["error"]["message"]
    t.join(10)


# -- views over in-memory images ---------------------------------------------------------------


def _img(tree: Tree) -> Image:
    return Image(write_image(tree))


def _names(view: ImageView | CompositionView, ino: int) -> list[str]:
    view.dir_listing(ino)
    return [n.decode() for n, _, _ in view.readdir(ino, 0)]


def test_image_view_numbers_and_listing() -> None:
    t = Tree.empty()
    assert t.root.entries is not None
    t.root.add(b"d", Node(mode=S_IFDIR | 0o755))
    t.root.add(b"f", Node(mode=S_IFREG | 0o600, size=3, content=b"abc"))
    t.root.add(b"w", Node(mode=S_IFCHR | 0o644, rdev=0))  # shown as an escaped whiteout
    img = _img(t)
    v = ImageView("k", 3, b"\0" * 32, img, timeout=5.0, listings=ListingCache(100))
    assert v.root_ino == make_ino(3, 0, img.root_nid)
    assert _names(v, v.root_ino) == ["d", "f", "w"]
    f = v.lookup(v.root_ino, b"f")
    assert f is not None and f.st_ino & NID_MASK == img.lookup(img.root_nid, b"f")
    assert f.st_size == 3 and stat.S_IMODE(f.st_mode) == 0o600
    missing = v.lookup(v.root_ino, b"nope")
    assert missing is None
    ref = v.file(f.st_ino)
    assert ref.digest is None and ref.image.read_inline(ref.nid, 0, 10) == b"abc"
    with pytest.raises(ViewError):
        v.getattr(make_ino(4, 0, img.root_nid))  # another view's number


def test_composition_view_rules_without_a_mount() -> None:
    low, up = Tree.empty(), Tree.empty()
    assert low.root.entries is not None and up.root.entries is not None
    for name in (b"a", b"gone", b"oci-gone"):
        low.root.add(name, Node(mode=S_IFREG | 0o644))
    low.root.add(b"dir", Node(mode=S_IFDIR | 0o755))
    low.root.entries[b"dir"].add(b"low", Node(mode=S_IFREG | 0o644))  # type: ignore[union-attr]
    up.root.add(b"dir", Node(mode=S_IFDIR | 0o700))
    up.root.entries[b"dir"].add(b"up", Node(mode=S_IFREG | 0o644))  # type: ignore[union-attr]
    up.root.add(b"gone", Node(mode=S_IFCHR | 0o644, rdev=0))
    up.root.add(b".wh.oci-gone", Node(mode=S_IFREG | 0o644))
    up.root.add(b"b", Node(mode=S_IFREG | 0o644))
    v = CompositionView("c", 5, [b"\1" * 32, b"\2" * 32], [_img(low), _img(up)], timeout=5.0)
    assert sorted(_names(v, v.root_ino)) == ["a", "b", "dir"]
    d = v.lookup(v.root_ino, b"dir")
    assert d is not None and d.st_nlink == 1 and stat.S_IMODE(d.st_mode) == 0o700
    assert sorted(_names(v, d.st_ino)) == ["low", "up"]
    assert v.lookup(v.root_ino, b"gone") is None
    assert v.lookup(v.root_ino, b".wh.oci-gone") is None
    a = v.lookup(v.root_ino, b"a")
    assert a is not None and split_ino(a.st_ino)[1] == 0  # from the lower layer
    b = v.lookup(v.root_ino, b"b")
    assert b is not None and split_ino(b.st_ino)[1] == 1


# -- the filesystem's two ways of serving (no mount: handlers called directly) -----------------


def _fs_with_view(
    tmp_path: Path, kernel_opens: bool
) -> tuple[DataPlaneFS, ImageView, int, int, bytes]:
    """A filesystem with one image view: ``small`` inline, ``obj`` backed by an object."""
    from csi.fuse.objects import ObjectStoreAccess
    from csi.image.fsverity import digest_bytes
    from csi.image.tree import object_path

    data = os.urandom(10_000)
    digest = digest_bytes(data)
    objects = tmp_path / "objects"
    (objects / object_path(digest).decode()).parent.mkdir(parents=True)
    (objects / object_path(digest).decode()).write_bytes(data)
    t = Tree.empty()
    assert t.root.entries is not None
    t.root.add(b"small", Node(mode=S_IFREG | 0o644, size=3, content=b"abc"))
    t.root.add(
        b"obj",
        Node(mode=S_IFREG | 0o644, size=len(data), payload=object_path(digest), digest=digest),
    )
    access = ObjectStoreAccess(
        lambda d: objects / object_path(d).decode(),
        fd_cache_size=4,
        io_threads=2,
        demand_fetch_threads=1,
        prefetch_threads=1,
        fetch_timeout=5,
    )
    fs = DataPlaneFS(access, timeout=5.0, kernel_opens=kernel_opens)
    view = ImageView("k", fs.allocate_slot(), b"\0" * 32, _img(t), timeout=5.0)
    fs.attach(view)
    small = view.lookup(view.root_ino, b"small")
    obj = view.lookup(view.root_ino, b"obj")
    assert small is not None and obj is not None
    return fs, view, small.st_ino, obj.st_ino, data


def test_kernel_opens_with_the_patched_pyfuse3(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """open/opendir answer ENOSYS (the kernel opens by itself from then on) and read takes
    the inode number."""
    import pyfuse3

    if not kernel_opens_supported():
        pytest.skip("pyfuse3 without the inode_as_fh patch (scripts/setup.sh installs it)")
    caplog.set_level(logging.INFO, logger="csi.fuse.fs")
    fs, _view, small, obj, data = _fs_with_view(tmp_path, kernel_opens=True)
    assert fs.inode_as_fh and pyfuse3.Operations.inode_as_fh is False  # set on ours only
    assert _gauge("composefs_csi_fuse_kernel_opens") == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    async def main() -> None:
        for call in (fs.open(obj, os.O_RDONLY, None), fs.opendir(fs.views["k"].root_ino, None)):
            with pytest.raises(pyfuse3.FUSEError) as e:
                await call
            assert e.value.errno == errno.ENOSYS
        assert await fs.read(small, 0, 4096) == b"abc"
        assert await fs.read(obj, 0, 4096) == data[:4096]
        assert await fs.read(obj, 9000, 4096) == data[9000:]  # clamped to the file size
        assert await fs.read(obj, 10_000, 4096) == b""
        assert await fs.read(obj, 100, 50) == data[100:150]  # now from the descriptor cache

    trio.run(main)


def test_stock_pyfuse3_falls_back_to_file_handles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Without the patch (simulated by removing its attribute), opens and reads go through
    file handles as before, and the log and a metric say kernel opens are off."""
    import pyfuse3

    if hasattr(pyfuse3.Operations, "inode_as_fh"):
        monkeypatch.delattr(pyfuse3.Operations, "inode_as_fh")
    assert not kernel_opens_supported()
    caplog.set_level(logging.INFO, logger="csi.fuse.fs")
    fs, view, small, obj, data = _fs_with_view(tmp_path, kernel_opens=True)
    assert not fs.inode_as_fh
    assert _gauge("composefs_csi_fuse_kernel_opens") == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "inode_as_fh" in warnings[0]

    async def main() -> None:
        fi = await fs.open(obj, os.O_RDONLY, None)
        assert fi.fh != obj and view.open_files == 1
        assert await fs.read(fi.fh, 0, 20_000) == data
        with pytest.raises(pyfuse3.FUSEError) as e:
            await fs.read(obj, 0, 10)  # an inode number is not a handle here
        assert e.value.errno == errno.EBADF
        fi2 = await fs.open(small, os.O_RDONLY, None)
        assert await fs.read(fi2.fh, 1, 10) == b"bc"
        with pytest.raises(pyfuse3.FUSEError) as e:
            await fs.open(obj, os.O_WRONLY, None)
        assert e.value.errno == errno.EROFS
        await fs.release(fi.fh)
        await fs.release(fi2.fh)
        assert view.open_files == 0

    trio.run(main)


def test_removed_view_lives_until_the_kernel_forgets_it(tmp_path: Path) -> None:
    """A removed view stays readable while the kernel holds inodes of it (lookups minus
    forgets), and is closed when the last is forgotten."""
    fs, view, _small, obj, data = _fs_with_view(tmp_path, kernel_opens=True)
    closed: list[bool] = []
    view.close = lambda: closed.append(True)  # type: ignore[method-assign]

    async def main() -> None:
        await fs.lookup(1, b"k", None)  # the view root, from the mount root
        attrs = await fs.lookup(view.root_ino, b"obj", None)
        assert attrs.st_ino == obj
        fs.detach(view)
        assert not closed and "k" not in fs.views
        assert (await fs.getattr(obj, None)).st_size == len(data)
        await fs.forget([(obj, 1)])
        assert not closed
        await fs.forget([(view.root_ino, 1)])
        assert closed == [True]

    trio.run(main)


def _gauge(name: str) -> float:
    from csi.metrics import REGISTRY

    value = REGISTRY.get_sample_value(name)
    assert value is not None
    return value


def test_small_reads_leave_the_trio_thread_only_when_local_reads_are_slow(
    tmp_path: Path,
) -> None:
    """Small uncached reads run on the calling thread while such reads have been fast, and
    on worker threads once they are slow on average (e.g. a network disk); large reads
    always go to a worker thread."""
    from csi.fuse.objects import INLINE_IO_MAX

    fs, _view, _small, obj, data = _fs_with_view(tmp_path, kernel_opens=True)
    access = fs.objects
    digest = fs.views["k"].file(obj).digest
    assert digest is not None

    async def main() -> None:
        assert await access.read(digest, len(data), None, 4096, 0) == data[:4096]
        assert len(access.io) == 0  # no worker thread was needed
        assert 0 < access.io_time < INLINE_IO_MAX
        access.fds.close_all()
        access.io_time = INLINE_IO_MAX * 10  # as if the disk were slow
        assert await access.read(digest, len(data), None, 4096, 4096) == data[4096:8192]
        assert len(access.io) == 1
        access.io_time = 0.0
        big = await access.read(digest, len(data), None, 1 << 20, 0)  # clamped by pread
        assert big == data

    trio.run(main)
    access.io.close()


def test_kernel_version_parsing_for_kernel_opens() -> None:
    from csi.fuse.fs import _NO_OPENDIR_KERNEL, _kernel_version

    assert _kernel_version("6.18.44-fc-v1300") == (6, 18)
    assert _kernel_version("5.1.0") == _NO_OPENDIR_KERNEL
    assert _kernel_version("4.19.0-27-amd64") < _NO_OPENDIR_KERNEL
    assert _kernel_version("5.10rc1") == (5, 10)
    assert _kernel_version("weird") == (0, 0)
