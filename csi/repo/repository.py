"""A repository directory: objects, images and refs (BRIEF §2.1).

Writes never leave a partial or unverified file under ``objects/`` or ``images/``: content is
written to a flock'd temp file in ``.tmp/`` (same filesystem), hashed while written, checked,
``fchmod 0644``, ``fsync``'d and renamed into place. Symlinks are created under a temp name
and renamed over the final one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from csi.image.fsverity import FsVerityHasher, digest_file

from . import layout
from .errors import (
    DigestMismatch,
    ReadOnlyRepository,
    RefNotFound,
    RepoError,
    UnsupportedRepository,
)
from .tmpfiles import TempArea, TempFile

_COPY_CHUNK = 1 << 20
_FICLONE = 0x40049409

#: Features we write into meta.json and understand when reading one (composefs-rs model:
#: unknown "incompatible" -> refuse; unknown "read-only-compatible" -> read only).
KNOWN_COMPAT: frozenset[str] = frozenset()
KNOWN_RO_COMPAT: frozenset[str] = frozenset({"v1_erofs"})
KNOWN_INCOMPAT: frozenset[str] = frozenset()

#: A progress callback: called with (done, total) counts.
Progress = Callable[[int, int], None]


def default_meta() -> dict[str, Any]:
    """The meta.json we write (composefs-rs layout, SHA-256, EROFS format V1 images)."""
    return {
        "version": layout.FORMAT_VERSION,
        "algorithm": layout.ALGORITHM,
        "features": {
            "compatible": [],
            "read-only-compatible": ["v1_erofs"],
            "incompatible": [],
        },
        "erofs_formats": {"default": 1, "extra": []},
    }


@dataclass
class VerifyReport:
    """Result of :meth:`Repository.verify`."""

    objects_checked: int = 0
    images_checked: int = 0
    refs_checked: int = 0
    bytes_checked: int = 0
    #: (path relative to the repository, what is wrong)
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        head = (
            f"checked {self.objects_checked} objects ({self.bytes_checked} bytes), "
            f"{self.images_checked} images, {self.refs_checked} refs: "
        )
        if self.ok:
            return head + "all good"
        lines = [head + f"{len(self.problems)} problem(s)"]
        lines += [f"  {p}: {why}" for p, why in self.problems]
        return "\n".join(lines)


def hash_into(src_fd: int, dst: TempFile | None) -> tuple[bytes, int]:
    """Read ``src_fd`` to its end, hashing; copy into ``dst`` if given. (digest, size)."""
    h = FsVerityHasher()
    buf = bytearray(_COPY_CHUNK)
    view = memoryview(buf)
    while True:
        n = os.readv(src_fd, [buf])
        if not n:
            break
        chunk = view[:n]
        h.update(chunk)
        if dst is not None:
            _write_all(dst.fd, chunk)
    return h.digest(), h.size


def _write_all(fd: int, data: memoryview | bytes) -> None:
    mv = memoryview(data)
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]


def object_file_exists(path: str) -> bool:
    """Whether ``path`` is an object file: a regular file, or a symlink to one (as
    ``Path.is_file()``); other errors than its absence are raised. For a process that has
    the path but no :class:`Repository` (a fetch worker)."""
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return False
        raise
    return stat.S_ISREG(st.st_mode)


class Repository:
    """A repository rooted at ``root`` (see :mod:`csi.repo.layout`)."""

    def __init__(self, root: Path, *, create: bool = False) -> None:
        self.root = Path(root)
        self._root_str = str(self.root)
        self.read_only = False
        self.tmp = TempArea(self.root / layout.TMP_DIR)
        meta_path = self.root / layout.META_FILE
        if create:
            self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
            if not meta_path.exists():
                self._write_meta(default_meta())
            for d in (layout.OBJECTS_DIR, f"{layout.IMAGES_DIR}/{layout.REFS_DIR}"):
                (self.root / d).mkdir(mode=0o755, parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise RepoError(f"repository {self.root} does not exist or is not a directory")
        self.meta = self._check_meta(meta_path)

    # -- meta.json -------------------------------------------------------------------------

    def _write_meta(self, meta: dict[str, Any]) -> None:
        data = (json.dumps(meta, indent=2) + "\n").encode()
        with self.tmp.create("meta") as t:
            _write_all(t.fd, data)
            os.fchmod(t.fd, 0o644)
            os.fsync(t.fd)
            t.publish(self.root / layout.META_FILE, replace=False)

    def _check_meta(self, path: Path) -> dict[str, Any]:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            # No meta.json: accepted, treated as a SHA-256 layout (older repositories and
            # plain mkcomposefs --digest-store style trees).
            return {}
        try:
            meta = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise UnsupportedRepository(f"{path}: not valid JSON: {e}") from e
        if not isinstance(meta, dict):
            raise UnsupportedRepository(f"{path}: expected a JSON object")
        version = meta.get("version")
        if not isinstance(version, int) or version > layout.FORMAT_VERSION:
            raise UnsupportedRepository(
                f"{path}: repository format version {version!r} is not supported "
                f"(this tool understands version {layout.FORMAT_VERSION})"
            )
        algorithm = meta.get("algorithm")
        if algorithm != layout.ALGORITHM:
            hint = ""
            if isinstance(algorithm, str) and "sha512" in algorithm:
                hint = (
                    " (a SHA-512 repository, e.g. made by `cfsctl init` without "
                    "--hash sha256; composefs-csi serves SHA-256 repositories only)"
                )
            raise UnsupportedRepository(
                f"{path}: algorithm {algorithm!r} is not supported, expected "
                f"{layout.ALGORITHM!r}{hint}"
            )
        features = meta.get("features") or {}
        if not isinstance(features, dict):
            raise UnsupportedRepository(f"{path}: 'features' must be an object")
        incompat = set(features.get("incompatible") or []) - KNOWN_INCOMPAT
        if incompat:
            raise UnsupportedRepository(
                f"{path}: repository requires unknown incompatible features {sorted(incompat)}"
            )
        if set(features.get("read-only-compatible") or []) - KNOWN_RO_COMPAT:
            self.read_only = True
        return meta

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnlyRepository(
                f"repository {self.root} lists read-only-compatible features this tool does "
                "not know: it can be read but not written"
            )

    # -- paths -----------------------------------------------------------------------------

    def object_path(self, digest: bytes) -> Path:
        return self.root / layout.object_relpath(digest)

    def object_file(self, digest: bytes) -> str:
        """:meth:`object_path` as a string (no ``Path`` built: for per-object hot paths)."""
        return f"{self._root_str}/{layout.object_relpath(digest)}"

    def image_path(self, digest: bytes) -> Path:
        """``images/<64 hex>`` (a symlink into ``objects/``)."""
        return self.root / layout.IMAGES_DIR / layout.check_digest(digest).hex()

    def ref_path(self, name: str) -> Path:
        return self.root / layout.IMAGES_DIR / layout.REFS_DIR / layout.validate_ref_name(name)

    def missing_by_listing(self, digests: Iterable[bytes]) -> set[bytes]:
        """Which of ``digests`` have no object file, from listings of their ``objects/XX/``
        directories instead of a ``stat`` per object (for a set as large as the store's
        ``objects/`` or larger: 256 listings cost less than 100k lookups). An entry counts
        as :meth:`has_object` counts it: a regular file, or a symlink to one."""
        by_dir: dict[str, list[bytes]] = {}
        for d in digests:
            by_dir.setdefault(layout.check_digest(d)[:1].hex(), []).append(d)
        missing: set[bytes] = set()
        for xx, wanted in by_dir.items():
            try:
                with os.scandir(f"{self._root_str}/{layout.OBJECTS_DIR}/{xx}") as it:
                    here = {e.name for e in it if e.is_file()}
            except (FileNotFoundError, NotADirectoryError):
                here = set()
            missing.update(d for d in wanted if d[1:].hex() not in here)
        return missing

    def has_object(self, digest: bytes) -> bool:
        # A plain string path: this is asked for every object of every image fetched.
        return object_file_exists(self.object_file(digest))

    def has_image(self, digest: bytes) -> bool:
        return self.image_path(digest).is_file()  # follows the link: dangling -> False

    # -- writing ---------------------------------------------------------------------------

    def add_object_file(
        self, src: Path, digest: bytes | None = None, *, verify: bool = True
    ) -> tuple[bytes, bool]:
        """Copy ``src`` into the repository. Returns (digest, added_now).

        With ``digest`` given and ``verify`` false, an object already present under that
        name is not read again. The copy is a reflink when the filesystem allows it (the
        result is then read once to hash it), else a read/hash/write loop.
        """
        self._writable()
        if digest is not None:
            layout.check_digest(digest)
            if not verify and self.has_object(digest):
                return digest, False
        with open(src, "rb", buffering=0) as f, self.tmp.create() as t:
            sfd = f.fileno()
            cloned = False
            try:
                fcntl.ioctl(t.fd, _FICLONE, sfd)
                cloned = True
            except OSError:
                pass
            if cloned:
                with open(t.path, "rb", buffering=0) as g:
                    actual, _ = hash_into(g.fileno(), None)
            else:
                actual, _ = hash_into(sfd, t)
            if digest is not None and actual != digest:
                raise DigestMismatch(digest, actual, f"object copied from {src}")
            return actual, self._finish(t, actual)

    def add_object_bytes(self, data: bytes) -> tuple[bytes, bool]:
        """Store ``data`` as an object. Returns (digest, added_now)."""
        self._writable()
        h = FsVerityHasher()
        h.update(data)
        digest = h.digest()
        if self.has_object(digest):
            return digest, False
        with self.tmp.create() as t:
            _write_all(t.fd, data)
            return digest, self._finish(t, digest)

    def _finish(self, t: TempFile, digest: bytes) -> bool:
        os.fchmod(t.fd, 0o644)
        os.fsync(t.fd)
        return t.publish(self.object_path(digest))

    def add_image(self, data: bytes) -> bytes:
        """Store an image as an object and link ``images/<hex>`` to it. Returns its digest.

        A new image file gets a modification time of its own, a second past every other
        image's: a static server that derives a ref's ``ETag`` from the file it links to
        (nginx: mtime and size) then gives two images different ones even when they have the
        same size and were built within the same second, so that a client's conditional
        request for a ref that moved between them is never answered 304.
        """
        newest = max((self._mtime(d) for d in self.iter_images()), default=0)
        digest, added = self.add_object_bytes(data)
        if added:
            t = max(int(time.time()), newest + 1)
            os.utime(self.object_path(digest), (t, t))
        self.link_image(digest)
        return digest

    def _mtime(self, image: bytes) -> int:
        try:
            return int(os.stat(self.image_path(image)).st_mtime)
        except OSError:
            return 0

    def link_image(self, digest: bytes) -> None:
        """Create (or repair) ``images/<hex> -> ../objects/XX/<rest>``."""
        self._writable()
        path = self.image_path(digest)
        target = layout.image_link_target(digest)
        with contextlib.suppress(OSError):
            if os.readlink(path) == target:
                return
        self._atomic_symlink(target, path)

    def write_file(
        self, final: str | os.PathLike[str], data: bytes, *, replace: bool = True, tag: str = "file"
    ) -> bool:
        """Write ``data`` durably (mode 0644) and rename it into ``final``, making its folders.
        Without ``replace`` an existing ``final`` wins and False is returned."""
        self._writable()
        with self.tmp.create(tag) as t:
            view = memoryview(data)
            while view:
                view = view[os.write(t.fd, view) :]
            os.fchmod(t.fd, 0o644)
            os.fsync(t.fd)
            os.makedirs(os.path.dirname(final), mode=0o755, exist_ok=True)
            return t.publish(final, replace=replace)

    def set_ref(self, name: str, digest: bytes) -> None:
        """Point ``images/refs/<name>`` at image ``digest`` (atomic replace)."""
        self._writable()
        path = self.ref_path(name)
        self._atomic_symlink(layout.ref_link_target(name, digest), path)

    def remove_ref(self, name: str) -> bool:
        self._writable()
        try:
            os.unlink(self.ref_path(name))
        except FileNotFoundError:
            return False
        return True

    def _atomic_symlink(self, target: str, path: Path) -> None:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = self.tmp.symlink_name()
        os.symlink(target, tmp)
        try:
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    # -- reading ---------------------------------------------------------------------------

    def resolve_ref(self, ref: str) -> bytes:
        """``sha256:<64 hex>``, a bare ``<64 hex>`` or a ref name -> image digest."""
        if ref.startswith("sha256:") or layout.is_hex_digest(ref.lower()):
            return layout.parse_hex_digest(ref)
        path = self.ref_path(ref)
        try:
            target = os.readlink(path)
        except FileNotFoundError:
            raise RefNotFound(f"ref {ref!r} not found in repository {self.root}") from None
        except OSError as e:
            if e.errno == errno.EINVAL:
                raise RepoError(f"ref {ref!r} in repository {self.root} is not a symlink") from None
            raise
        return self._ref_target_digest(ref, target)

    def _ref_target_digest(self, ref: str, target: str) -> bytes:
        base = target.rsplit("/", 1)[-1]
        if not layout.is_hex_digest(base):
            raise RepoError(
                f"ref {ref!r} in repository {self.root} points at {target!r}, "
                "which is not an image name (64 hex)"
            )
        return bytes.fromhex(base)

    def iter_objects(self) -> Iterator[bytes]:
        """Every well-formed object name under ``objects/`` (images included)."""
        base = self.root / layout.OBJECTS_DIR
        try:
            prefixes = sorted(os.listdir(base))
        except FileNotFoundError:
            return
        for p in prefixes:
            try:
                names = os.listdir(base / p)
            except (NotADirectoryError, FileNotFoundError):
                continue
            for n in names:
                if layout.is_object_name(p, n):
                    yield bytes.fromhex(p + n)

    def iter_images(self) -> Iterator[bytes]:
        """Every ``images/<64 hex>`` entry (whether or not its target exists)."""
        try:
            names = sorted(os.listdir(self.root / layout.IMAGES_DIR))
        except FileNotFoundError:
            return
        for n in names:
            if layout.is_hex_digest(n):
                yield bytes.fromhex(n)

    def iter_refs(self) -> Iterator[tuple[str, bytes]]:
        """(name, digest) for every ref symlink; malformed entries are skipped."""
        base = self.root / layout.IMAGES_DIR / layout.REFS_DIR
        for dirpath, _dirs, files in os.walk(base):
            for f in files:
                p = Path(dirpath) / f
                name = p.relative_to(base).as_posix()
                try:
                    yield name, self._ref_target_digest(name, os.readlink(p))
                except (OSError, RepoError):
                    continue

    def read_image(self, digest: bytes) -> bytes:
        return self.image_path(digest).read_bytes()

    # -- checking --------------------------------------------------------------------------

    def verify(self, progress: Progress | None = None) -> VerifyReport:
        """Recompute every object's digest and check every image and ref link."""
        rep = VerifyReport()
        objects = list(self.iter_objects())
        total = len(objects)
        for i, d in enumerate(objects):
            rel = layout.object_relpath(d)
            try:
                actual = digest_file(self.root / rel)
                rep.bytes_checked += (self.root / rel).stat().st_size
            except OSError as e:
                rep.problems.append((rel, f"unreadable: {e.strerror or e}"))
            else:
                if actual != d:
                    rep.problems.append((rel, f"content hashes to {actual.hex()}"))
            rep.objects_checked += 1
            if progress is not None:
                progress(i + 1, total)
        for d in self.iter_images():
            rel = f"{layout.IMAGES_DIR}/{d.hex()}"
            rep.images_checked += 1
            try:
                target = os.readlink(self.root / rel)
            except OSError:
                target = None  # a regular file: allowed, check its content
            if target is not None and target != layout.image_link_target(d):
                rep.problems.append((rel, f"links to {target!r}, expected the object {d.hex()}"))
                continue
            if target is not None:
                if not self.has_object(d):
                    rep.problems.append((rel, "dangling: its object is missing"))
                continue
            try:
                if digest_file(self.root / rel) != d:
                    rep.problems.append((rel, "content does not match its name"))
            except OSError as e:
                rep.problems.append((rel, f"unreadable: {e.strerror or e}"))
        base = self.root / layout.IMAGES_DIR / layout.REFS_DIR
        for dirpath, _dirs, files in os.walk(base):
            for f in files:
                p = Path(dirpath) / f
                rel = p.relative_to(self.root).as_posix()
                rep.refs_checked += 1
                try:
                    d = self._ref_target_digest(rel, os.readlink(p))
                except OSError:
                    rep.problems.append((rel, "not a symlink"))
                    continue
                except RepoError as e:
                    rep.problems.append((rel, str(e)))
                    continue
                if not p.is_file():
                    rep.problems.append((rel, f"dangling: image {d.hex()} is missing"))
        return rep
