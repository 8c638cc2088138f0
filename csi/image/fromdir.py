"""A :class:`~csi.image.tree.Tree` from a directory on disk, like ``mkcomposefs DIR``.

What is taken from each entry (``lstat``, never following symlinks):

- mode, uid, gid, mtime with nanoseconds (``0`` with ``use_epoch``), ``rdev`` of devices
  (truncated to 32 bits as libcomposefs stores it), symlink targets;
- regular files of 1..``inline_max`` bytes are stored inline (``Node.content``); larger
  ones get ``Node.digest`` = their fs-verity digest and ``Node.payload`` =
  ``object_path(digest)``, and are listed in :attr:`ScanResult.objects` (one entry per
  distinct digest) so the caller can store them; empty files are neither;
- xattrs as ``listxattr``/``getxattr`` return them (``xattrs="all"``: everything the kernel
  shows, so ``security.*``, ``trusted.*`` when root, and ``system.posix_acl_access`` /
  ``system.posix_acl_default`` in their raw xattr encoding; ``"user"``: ``user.*`` only;
  ``"none"``). mkcomposefs 1.0.8 does exactly this: it keeps ACL xattrs verbatim (the image
  then gets the HAS_ACL flag) and keeps ``trusted.overlay.*`` found on disk, which the
  writer escapes to ``trusted.overlay.overlay.*``. A filesystem without xattr support
  counts as "no xattrs". Like mkcomposefs, an inode whose xattrs exceed the 32767-byte
  budget (``12 + sum(7 + len(key) + len(value))``) is an error.
- Hard links (``hardlinks=True``): names sharing ``(st_dev, st_ino)`` become one node; the
  first name in breadth-first sorted order (the writer's inode order) is the node, the
  others :class:`~csi.image.tree.HardLink`; ``nlink`` = number of names within the tree
  (composefs-rs behaviour). With ``hardlinks=False`` every name is its own node with
  ``nlink`` 1: mkcomposefs 1.0.8 behaviour, so the image equals ``mkcomposefs DIR``'s.
- Directories: ``nlink`` = 2 + subdirectories, ``size`` 0 (the writer computes both).
- ``one_file_system``: a directory on another filesystem than the root is kept (its own
  metadata) but not descended into.

File contents are hashed in parallel threads (``hashlib`` releases the GIL on large
buffers), reading 1 MiB at a time; each file is hashed once however many names it has.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Literal

from .errors import TreeError
from .fsverity import FsVerityHasher
from .tree import INLINE_CONTENT_DEFAULT_MAX, HardLink, Node, Tree, object_path

__all__ = ["DigestFn", "ProgressCallback", "ScanOptions", "ScanResult", "scan_directory"]

#: ``progress(files_done, bytes_done)``: called as external files finish hashing.
ProgressCallback = Callable[[int, int], None]
#: ``digest_fn(path, size) -> fs-verity digest``: hashes one external file. The default reads
#: it; ``composefs-csi build`` passes one that copies into the repository while hashing, so
#: each file is read once.
DigestFn = Callable[[bytes, int], bytes]

_READ_SIZE = 1 << 20
_XATTR_BUDGET = 0xFFFF // 2
_U32 = 0xFFFFFFFF


@dataclass
class ScanOptions:
    use_epoch: bool = False
    xattrs: Literal["all", "user", "none"] = "all"
    hardlinks: bool = True
    inline_max: int = INLINE_CONTENT_DEFAULT_MAX
    compute_digest: bool = True
    one_file_system: bool = False
    #: Hashing threads; ``None``: one per CPU (at least 2, at most 16).
    threads: int | None = None


@dataclass
class ScanResult:
    tree: Tree
    #: ``(digest, source path, size)`` of every distinct external content, BFS order.
    objects: list[tuple[bytes, str, int]] = field(default_factory=list)
    #: With ``compute_digest=False``: every external file's node and source path, for the
    #: caller to hash (it must set ``digest`` and ``payload`` before writing the image).
    unhashed: list[tuple[Node, bytes]] = field(default_factory=list)
    #: Regular-file inodes found (each hard-linked file once) and their total size.
    files: int = 0
    bytes: int = 0


def scan_directory(
    path: str | os.PathLike[str],
    options: ScanOptions | None = None,
    progress: ProgressCallback | None = None,
    digest_fn: DigestFn | None = None,
) -> ScanResult:
    """Build the tree of the directory at ``path`` (see the module docstring)."""
    opts = options or ScanOptions()
    if not 0 <= opts.inline_max <= 5000:
        raise ValueError("inline_max must be within 0..5000")
    top = os.fsencode(path)
    st = os.stat(top)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", os.fsdecode(top))
    scan = _Scan(opts)
    root = scan.node(top, st)
    scan.walk(root, top, st.st_dev)
    result = ScanResult(Tree(root), files=scan.files, bytes=scan.bytes)
    if not opts.compute_digest:
        result.unhashed = scan.to_hash
    elif scan.to_hash:
        result.objects = _hash_all(scan.to_hash, opts.threads, progress, digest_fn or _digest)
    return result


class _Scan:
    def __init__(self, opts: ScanOptions) -> None:
        self.opts = opts
        self.inodes: dict[tuple[int, int], Node] = {}
        self.names: dict[int, int] = {}  # id(node) -> names, hard-linked nodes only
        self.to_hash: list[tuple[Node, bytes]] = []
        self.files = 0
        self.bytes = 0

    def walk(self, root: Node, top: bytes, root_dev: int) -> None:
        queue: deque[tuple[Node, bytes]] = deque([(root, top)])
        while queue:
            d, dpath = queue.popleft()
            assert d.entries is not None
            with os.scandir(dpath) as it:
                found = sorted(it, key=lambda e: e.name)
            subdirs = 0
            for e in found:
                st = e.stat(follow_symlinks=False)
                if self.opts.hardlinks and not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                    key = (st.st_dev, st.st_ino)
                    first = self.inodes.get(key)
                    if first is not None:
                        d.entries[e.name] = HardLink(first)
                        self.names[id(first)] += 1
                        continue
                    child = self.node(e.path, st)
                    self.inodes[key] = child
                    self.names[id(child)] = 1
                else:
                    child = self.node(e.path, st)
                d.entries[e.name] = child
                if child.is_dir:
                    subdirs += 1
                    if not (self.opts.one_file_system and st.st_dev != root_dev):
                        queue.append((child, e.path))
            d.nlink = 2 + subdirs
        for node in self.inodes.values():
            node.nlink = self.names[id(node)]

    def node(self, path: bytes, st: os.stat_result) -> Node:
        opts = self.opts
        n = Node(mode=st.st_mode, uid=st.st_uid, gid=st.st_gid)
        if not opts.use_epoch:
            n.mtime_sec, n.mtime_nsec = divmod(st.st_mtime_ns, 1_000_000_000)
        ft = stat.S_IFMT(st.st_mode)
        if ft == stat.S_IFREG:
            n.size = st.st_size
            self.files += 1
            self.bytes += st.st_size
            if 0 < st.st_size <= opts.inline_max:
                with open(path, "rb") as f:
                    content = f.read(st.st_size + 1)
                if len(content) != st.st_size:
                    raise TreeError(f"{os.fsdecode(path)}: changed size while scanned")
                n.content = content
            elif st.st_size > 0:
                self.to_hash.append((n, path))
        elif ft == stat.S_IFLNK:
            n.payload = os.readlink(path)
            n.size = len(n.payload)
        elif ft in (stat.S_IFCHR, stat.S_IFBLK):
            n.rdev = st.st_rdev & _U32
        elif ft != stat.S_IFDIR:
            n.size = st.st_size
        if opts.xattrs != "none":
            n.xattrs = _read_xattrs(path, user_only=opts.xattrs == "user")
        return n


def _read_xattrs(path: bytes, *, user_only: bool) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    out: dict[bytes, bytes] = {}
    budget = 0
    for name in names:
        if user_only and not name.startswith("user."):
            continue
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.ENODATA:  # removed since listed
                continue
            raise
        key = os.fsencode(name)
        budget += 7 + len(key) + len(value) + (12 if not out else 0)
        if budget > _XATTR_BUDGET:
            raise TreeError(f"{os.fsdecode(path)}: xattrs exceed {_XATTR_BUDGET} bytes")
        out[key] = value
    return out


def _digest(path: bytes, size: int) -> bytes:
    h = FsVerityHasher()
    buf = bytearray(_READ_SIZE)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    if h.size != size:
        raise TreeError(f"{os.fsdecode(path)}: changed size while scanned")
    return h.digest()


def _hash_all(
    todo: list[tuple[Node, bytes]],
    threads: int | None,
    progress: ProgressCallback | None,
    digest_fn: DigestFn,
) -> list[tuple[bytes, str, int]]:
    workers = threads or max(2, min(16, os.cpu_count() or 2))
    done_files = 0
    done_bytes = 0
    # Bounded submission keeps memory flat for millions of files.
    window = workers * 8
    it = iter(range(len(todo)))
    pending: dict[Future[bytes], int] = {}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fsverity") as pool:

        def submit_more() -> None:
            for i in it:
                node, path = todo[i]
                pending[pool.submit(digest_fn, path, node.size)] = i
                if len(pending) >= window:
                    return

        submit_more()
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                i = pending.pop(fut)
                node, _path = todo[i]
                digest = fut.result()
                node.digest = digest
                node.payload = object_path(digest)
                done_files += 1
                done_bytes += node.size
            if progress is not None:
                progress(done_files, done_bytes)
            submit_more()
    objects: dict[bytes, tuple[bytes, str, int]] = {}
    for node, path in todo:
        assert node.digest is not None
        if node.digest not in objects:
            objects[node.digest] = (node.digest, os.fsdecode(path), node.size)
    return list(objects.values())
