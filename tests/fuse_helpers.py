"""Helpers for the FUSE data plane tests and benchmarks: stores with images, the daemon in a
subprocess, generated trees, and a field-by-field comparison of two mounted trees."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from csi.fuse.client import DataPlaneClient
from csi.fuse.mounting import is_mounted, umount
from csi.image.fsverity import digest_bytes
from csi.image.tree import (
    S_IFBLK,
    S_IFCHR,
    S_IFDIR,
    S_IFIFO,
    S_IFLNK,
    S_IFREG,
    S_IFSOCK,
    HardLink,
    Node,
    Tree,
    object_path,
)
from csi.image.writer import write_image

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a metrics address)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric_values(port: int, name: str) -> dict[str, float]:
    """Samples of metric ``name`` the daemon at ``port`` exports now, by their label text
    (``""`` for an unlabelled one)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    out: dict[str, float] = {}
    for line in text.decode().splitlines():
        key, _, value = line.rpartition(" ")
        if key == name or key.startswith(name + "{"):
            out[key[len(name) :].strip("{}")] = float(value)
    return out


def fuse_unavailable() -> str | None:
    """None if FUSE mounts can be made here, else why not (for pytest.skip)."""
    if os.geteuid() != 0:
        return "FUSE data plane tests need root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    try:
        import pyfuse3  # noqa: F401
    except ImportError as e:
        return f"pyfuse3 is not installed ({e})"
    return None


# -- stores and images ----------------------------------------------------------------------


def external(data: bytes, **kw: Any) -> tuple[Node, bytes]:
    """A regular file node whose content is an object; returns (node, data)."""
    d = digest_bytes(data)
    return Node(
        mode=kw.pop("mode", S_IFREG | 0o644), size=len(data), payload=object_path(d), digest=d, **kw
    ), data


def add_objects(store_root: Path, blobs: dict[bytes, bytes] | list[bytes]) -> None:
    """Write objects straight into a store's ``objects/`` (the store adopts them on open)."""
    items = blobs.values() if isinstance(blobs, dict) else blobs
    for data in items:
        p = store_root / "objects" / object_path(digest_bytes(data)).decode()
        if p.exists():
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_bytes(data)
        os.chmod(tmp, 0o644)
        tmp.rename(p)


def add_image(store_root: Path, tree: Tree, objects: list[bytes] | None = None) -> bytes:
    """Write ``tree`` as an image into the store (and its objects); returns the digest."""
    from csi.store import Store

    if objects:
        add_objects(store_root, objects)
    with Store(store_root) as store:
        return store.add_image_bytes(write_image(tree))


def tree_objects(tree: Tree, data: dict[int, bytes]) -> list[bytes]:
    return list(data.values())


# -- the daemon in a subprocess ---------------------------------------------------------------


@dataclass
class Daemon:
    mountpoint: Path
    socket: Path
    store: Path
    proc: subprocess.Popen[bytes]
    log: Path
    client: DataPlaneClient = field(init=False)

    def __post_init__(self) -> None:
        self.client = DataPlaneClient(self.socket, timeout=60)

    def view_path(self, digests: list[bytes], **kw: Any) -> Path:
        return Path(self.client.add_view(digests, "test", **kw)["path"])

    def open_fds(self) -> list[str]:
        """Targets of the daemon's open file descriptors."""
        out = []
        for fd in os.listdir(f"/proc/{self.proc.pid}/fd"):
            with contextlib.suppress(OSError):
                out.append(os.readlink(f"/proc/{self.proc.pid}/fd/{fd}"))
        return out

    def rss_kb(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0


@contextlib.contextmanager
def run_daemon(store: Path, *, work: Path | None = None, **config: Any) -> Iterator[Daemon]:
    """Start ``python -m csi.fuse`` on a fresh mountpoint; stop it and clean up on exit."""
    base = Path(tempfile.mkdtemp(prefix="cfs-fuse-", dir=work))
    mnt, sock, log = base / "mnt", base / "control.sock", base / "daemon.log"
    cfg = {"mountpoint": str(mnt), "control_socket": str(sock), "store": str(store), **config}
    (base / "config.json").write_text(json.dumps(cfg))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "csi.fuse", str(base / "config.json")],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
    d = Daemon(mnt, sock, store, proc, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {proc.returncode}:\n{log.read_text()}")
            try:
                d.client.ping()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield d
    finally:
        stop_daemon(d)
        with contextlib.suppress(OSError):
            for p in (sock, base / "config.json"):
                p.unlink(missing_ok=True)
            mnt.rmdir()


def stop_daemon(d: Daemon) -> None:
    if d.proc.poll() is None:
        d.proc.send_signal(signal.SIGTERM)
        try:
            d.proc.wait(30)
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.proc.wait(10)
    if is_mounted(d.mountpoint):
        umount(d.mountpoint, detach=True)


# -- generated trees --------------------------------------------------------------------------


def random_tree(seed: int, *, big_dir: int = 0, n: int = 60) -> tuple[Tree, list[bytes]]:
    """A tree with every kind of entry; returns it and the object contents it references."""
    rng = random.Random(seed)
    blobs: list[bytes] = []
    root = Node(
        mode=S_IFDIR | 0o755,
        mtime_sec=1_700_000_000,
        mtime_nsec=rng.randrange(10**9),
        xattrs={b"user.root": b"r"},
    )
    tree = Tree(root)
    dirs = [root]
    files: list[Node] = []

    def name() -> bytes:
        kind = rng.random()
        if kind < 0.05:
            return bytes(rng.choice(b"abcdefgh") for _ in range(255))
        if kind < 0.1:
            return ("ü-" + str(rng.randrange(10**6))).encode()
        if kind < 0.13:
            return b"-" + str(rng.randrange(1000)).encode()  # sorts before "."
        if kind < 0.15:
            return b"with space " + str(rng.randrange(1000)).encode()
        return b"n" + str(rng.randrange(10**6)).encode()

    def meta() -> dict[str, Any]:
        m: dict[str, Any] = {
            "uid": rng.choice([0, 1000, 70000]),
            "gid": rng.choice([0, 1000, 70001]),
            "mtime_sec": rng.choice([1_700_000_000, 1_700_000_123, 5]),
            "mtime_nsec": rng.choice([0, 0, rng.randrange(10**9)]),
        }
        x: dict[bytes, bytes] = {}
        if rng.random() < 0.3:
            x[b"user.k" + str(rng.randrange(5)).encode()] = os.urandom(rng.randrange(0, 40))
        if rng.random() < 0.1:
            x[b"security.selinux"] = b"system_u:object_r:etc_t:s0\0"
        if rng.random() < 0.1:
            x[b"trusted.overlay.custom"] = b"escaped"
        if rng.random() < 0.05:
            x[b"trusted.other"] = b"t"
        m["xattrs"] = x
        return m

    def add(parent: Node, node: Node | HardLink) -> None:
        assert parent.entries is not None
        for _ in range(20):
            nm = name()
            if nm not in parent.entries:
                parent.add(nm, node)
                return

    for _ in range(n):
        parent = rng.choice(dirs)
        r = rng.random()
        if r < 0.15:
            d = Node(mode=S_IFDIR | rng.choice([0o755, 0o700, 0o1777]), **meta())
            add(parent, d)
            dirs.append(d)
        elif r < 0.45:
            size = rng.choice([1, 100, 4095, 4096, 4097, 70000, 300000])
            data = rng.randbytes(size)
            node, data = external(data, **meta())
            blobs.append(data)
            add(parent, node)
            files.append(node)
        elif r < 0.55:
            size = rng.randrange(1, 65)
            content = rng.randbytes(size)
            node = Node(mode=S_IFREG | 0o640, size=size, content=content, **meta())
            add(parent, node)
            files.append(node)
        elif r < 0.6:
            node = Node(mode=S_IFREG | 0o600, **meta())
            add(parent, node)
            files.append(node)
        elif r < 0.7:
            target = rng.choice([b"x", b"../" * 3 + b"etc/passwd", b"t" * rng.randrange(1, 4000)])
            add(parent, Node(mode=S_IFLNK | 0o777, payload=target, **meta()))
        elif r < 0.75:
            add(
                parent,
                Node(
                    mode=rng.choice([S_IFCHR, S_IFBLK]) | 0o660,
                    rdev=os.makedev(rng.randrange(1, 300), rng.randrange(0, 300)),
                    **meta(),
                ),
            )
        elif r < 0.8:
            add(parent, Node(mode=rng.choice([S_IFIFO, S_IFSOCK]) | 0o644, **meta()))
        elif r < 0.88:
            add(parent, Node(mode=S_IFCHR | 0o644, rdev=0, **meta()))  # a whiteout
        elif files:
            target = rng.choice(files)
            target.nlink += 1
            add(parent, HardLink(target))
    if big_dir:
        big = Node(mode=S_IFDIR | 0o755)
        root.add(b"big", big)
        for i in range(big_dir):
            if i % 1000 == 0:
                node, data = external(f"object {i}".encode() * 20)
                blobs.append(data)
                big.add(f"file-{i:06d}".encode(), node)
            else:
                big.add(f"file-{i:06d}".encode(), Node(mode=S_IFREG | 0o644, size=0))
    return tree, blobs


# -- comparing two mounted trees ---------------------------------------------------------------

STAT_FIELDS = (
    "st_mode",
    "st_nlink",
    "st_uid",
    "st_gid",
    "st_size",
    "st_rdev",
    "st_blocks",
    "st_blksize",
    "st_atime_ns",
    "st_mtime_ns",
    "st_ctime_ns",
)


def _getxattr(p: Path, name: str) -> bytes | int:
    try:
        return os.getxattr(p, name, follow_symlinks=False)
    except OSError as e:  # e.g. user.* on a device: the VFS answers ENODATA
        return e.errno or -1


def snapshot(root: Path, *, ino_mask: int | None = None, contents: bool = True) -> dict[str, Any]:
    """Everything observable about a mounted tree, keyed by relative path.

    ``ino_mask``: inode numbers are recorded masked (None: recorded only as hardlink groups).
    """
    out: dict[str, Any] = {}
    groups: dict[tuple[int, int], str] = {}

    def visit(rel: str) -> None:
        p = root / rel if rel else root
        st = os.lstat(p)
        rec: dict[str, Any] = {f: getattr(st, f) for f in STAT_FIELDS}
        if ino_mask is not None:
            rec["ino"] = st.st_ino & ino_mask
        if not stat.S_ISDIR(st.st_mode):
            rec["same_inode_as"] = groups.setdefault((st.st_dev, st.st_ino), rel)
        names = os.listxattr(p, follow_symlinks=False)
        rec["xattrs"] = [(n, _getxattr(p, n)) for n in names]
        if stat.S_ISLNK(st.st_mode):
            rec["target"] = os.readlink(p)
        elif stat.S_ISREG(st.st_mode) and contents:
            try:
                with open(p, "rb") as f:
                    rec["sha256"] = hashlib.sha256(f.read()).hexdigest()
            except OSError as e:
                rec["open_error"] = e.errno
        elif stat.S_ISDIR(st.st_mode):
            entries = os.listdir(p)
            rec["entries"] = entries
            for e in entries:
                visit(f"{rel}/{e}" if rel else e)
        out[rel or "."] = rec

    visit("")
    return out


def diff(a: dict[str, Any], b: dict[str, Any], limit: int = 20) -> list[str]:
    """Human-readable differences between two snapshots (empty: identical)."""
    out = []
    for path in sorted(set(a) | set(b)):
        if path not in a or path not in b:
            out.append(f"{path}: only in {'first' if path in a else 'second'}")
            continue
        ra, rb = a[path], b[path]
        for k in sorted(set(ra) | set(rb)):
            if ra.get(k) != rb.get(k):
                out.append(f"{path}: {k}: {str(ra.get(k))[:200]} != {str(rb.get(k))[:200]}")
        if len(out) >= limit:
            break
    return out


# -- layered trees (compositions) ---------------------------------------------------------------

OPQ = b".wh..wh..opq"
XWHITEOUT = b"trusted.overlay.whiteout"
OPAQUE = b"trusted.overlay.opaque"


def layer_trees(
    seed: int, n_layers: int = 3, *, oci: bool = False
) -> tuple[list[Tree], list[bytes]]:
    """Layers (lowest first) that add, replace, delete and make opaque each other's entries.

    ``oci``: deletions are ``.wh.<name>`` files and opaque directories hold ``.wh..wh..opq``;
    otherwise overlay style: character devices 0/0 and ``trusted.overlay.opaque=y``.
    """
    rng = random.Random(seed)
    blobs: list[bytes] = []
    known: list[tuple[bytes, ...]] = []  # paths created in some layer (may be gone since)
    layers: list[Tree] = []

    def meta() -> dict[str, Any]:
        x = {b"user.l": str(rng.randrange(3)).encode()} if rng.random() < 0.3 else {}
        return {
            "uid": rng.choice([0, 1000]),
            "mtime_sec": 1_700_000_000 + rng.randrange(3),
            "mtime_nsec": rng.choice([0, 5]),
            "xattrs": x,
        }

    def leaf() -> Node | None:
        r = rng.random()
        if r < 0.4:
            node, data = external(rng.randbytes(rng.choice([100, 5000, 70000])), **meta())
            blobs.append(data)
            return node
        if r < 0.7:
            c = rng.randbytes(rng.randrange(1, 64))
            return Node(mode=S_IFREG | 0o644, size=len(c), content=c, **meta())
        if r < 0.85:
            return Node(
                mode=S_IFLNK | 0o777, payload=b"target-" + str(rng.randrange(9)).encode(), **meta()
            )
        return Node(mode=S_IFDIR | 0o755, **meta())

    for k in range(n_layers):
        tree = Tree(Node(mode=S_IFDIR | 0o755, mtime_sec=1_700_000_000 + k))
        opaque_dirs: set[int] = set()

        def parent_of(path: tuple[bytes, ...], tree: Tree = tree) -> Node | None:
            node = tree.root
            for part in path[:-1]:
                assert node.entries is not None
                child = node.entries.get(part)
                if child is None and b".wh." + part in node.entries:
                    return None
                if child is None:
                    child = Node(mode=S_IFDIR | rng.choice([0o755, 0o750]), **meta())
                    node.add(part, child)
                if isinstance(child, HardLink) or not child.is_dir:
                    return None
                node = child
            return node

        def free(parent: Node, name: bytes) -> bool:
            assert parent.entries is not None
            return (
                name not in parent.entries
                and b".wh." + name not in parent.entries
                and not name.startswith(b".wh.")
            )

        ops = 25 if k == 0 else 14
        for _ in range(ops):
            r = rng.random()
            if k == 0 or r < 0.35 or not known:
                base = rng.choice(known)[:-1] if known and rng.random() < 0.7 else ()
                path = (*base, b"e" + str(rng.randrange(40)).encode())
                op = "add"
            else:
                path = rng.choice(known)
                op = rng.choice(["replace", "delete", "delete", "opaque", "xattr-only"])
            parent = parent_of(path)
            if parent is None or not free(parent, path[-1]) or id(parent) in opaque_dirs:
                continue
            name = path[-1]
            if op in ("add", "replace"):
                node = leaf()
                if node is None:
                    continue
                parent.add(name, node)
                known.append(path)
            elif op == "delete":
                if oci:
                    parent.add(b".wh." + name, Node(mode=S_IFREG | 0o644))
                else:
                    parent.add(name, Node(mode=S_IFCHR | 0o644, rdev=0))
            elif op == "opaque":
                d = Node(mode=S_IFDIR | 0o755, **meta())
                if oci:
                    d.add(OPQ, Node(mode=S_IFREG | 0o644))
                else:
                    d.xattrs[OPAQUE] = b"y"
                parent.add(name, d)
                opaque_dirs.add(id(d))
                for i in range(rng.randrange(3)):
                    child = leaf()
                    if child is not None and not child.is_dir:
                        d.add(b"o" + str(i).encode(), child)
                        known.append((*path, b"o" + str(i).encode()))
            elif not oci:
                # An xattr whiteout (a zero-size file with trusted.overlay.whiteout), next to
                # a real whiteout so that the directory carries the opaque=x marker: overlayfs
                # only honours the xattr consistently (readdir and lookup) in marked
                # directories.
                wh = name + b"-wh"
                if free(parent, wh):
                    parent.add(name, Node(mode=S_IFREG | 0o644, xattrs={XWHITEOUT: b""}))
                    parent.add(wh, Node(mode=S_IFCHR | 0o644, rdev=0))
        layers.append(tree)
    return layers, blobs


def oci_to_overlay(tree: Tree) -> Tree:
    """The overlay-style equivalent of an OCI layer, for overlayfs itself to merge.

    ``.wh.<name>`` becomes an xattr whiteout (``trusted.overlay.whiteout`` on an empty file in a
    directory marked ``trusted.overlay.opaque=x``) and ``.wh..wh..opq`` the opaque xattr. The
    tree is modified in place and returned.
    """

    def fix(node: Node) -> None:
        assert node.entries is not None
        if OPQ in node.entries:
            del node.entries[OPQ]
            node.xattrs[OPAQUE] = b"y"
        for name in [n for n in node.entries if n.startswith(b".wh.")]:
            del node.entries[name]
            if node.xattrs.get(OPAQUE) != b"y":
                node.entries[name[4:]] = Node(mode=S_IFREG | 0o644, xattrs={XWHITEOUT: b""})
                node.xattrs[OPAQUE] = b"x"
        for child in node.entries.values():
            if isinstance(child, Node) and child.is_dir:
                fix(child)

    fix(tree.root)
    return tree
