"""The repository's temp area: flock'd temp files and per-name lock files.

Every temp file is created inside ``<repo>/.tmp`` (same filesystem as ``objects/``, so
a rename publishes it atomically) and stays ``flock``'d by its writer until it is renamed
or removed. A temp file nobody holds a lock on belongs to a dead writer: :meth:`TempArea.clean`
removes exactly those, so it is safe to run while other processes are writing.

Protocol (no race between a writer and a cleaner): the writer creates the file, locks it,
then checks the file still has a link; the cleaner removes a file only while holding its
lock. A writer that loses the race sees ``st_nlink == 0`` and starts over.

Cross-process mutual exclusion per key (one writer per digest) uses :class:`KeyLocks`: OFD
byte-range locks on a few fixed files, ``locks/keys.lock`` and ``locks/keys-<n>.lock``, at an
offset derived from the key. Nothing is created or removed per key, and the kernel drops the
locks of a dead process.

Whose is what (:meth:`TempArea.owner`): each process that uses the area names itself with a
random *owner id* and holds ``owners/<id>.owner`` ``flock``'d for its life. Anything marked
with that id (worker temp files, temp symlinks, the store's pins) is in use exactly while
somebody holds that lock. Unlike a pid, the id is never reused, and it means the same thing
in every pid namespace that shares the filesystem: a containerised process is often pid 1.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import re
import secrets
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

LOCKS_DIR = "locks"
#: Owner files (:meth:`TempArea.owner`), ``<owner id>.owner``.
OWNERS_DIR = "owners"
OWNER_SUFFIX = ".owner"
#: Suffix of the temp files that worker processes (of a build, or of a bulk fetch) write
#: without a lock, named ``<owner id of the process they work for>-<random><suffix>``: in use
#: while that owner lives.
WORKER_TEMP_SUFFIX = ".worker.tmp"
#: Suffix of the directory a fetch worker process writes its temp files in,
#: ``<owner id>-<pool>-<random>.worker.d`` (:func:`worker_dir`): in use while that owner
#: lives. Four workers creating files in one directory queue on its lock (and make it large:
#: a directory never shrinks); each in its own, creating and naming 100k files took about a
#: fifth less kernel time (micro-benchmark: 3.4-3.7 s against 4.3 s).
WORKER_DIR_SUFFIX = ".worker.d"
_OWNER_ID = re.compile(r"[0-9a-f]{32}")
#: Seconds a pid-named temp file of an older version is taken as in use while that pid exists.
LEGACY_MARK_MAX_AGE = 86400.0
#: The files holding the :class:`KeyLocks` range locks (inside ``LOCKS_DIR``; never cleaned):
#: this one, and ``keys-<n>.lock`` for n from 1 to KEY_LOCK_SHARDS - 1.
KEY_LOCKS_FILE = "keys.lock"
#: The kernel walks a file's whole lock list to take one lock; a bulk fetch holds about 16k
#: (8 chunks of 2048 objects) at once. With 16 files that walk was a tenth of the machine's
#: CPU in a 100k-object pull (``perf``: ``posix_lock_inode``); with 64, the list is 4x
#: shorter, and a claim of a big chunk holds at most 64 descriptors. (A process of a version
#: with another count shares the files for only some keys: during an upgrade two processes
#: may then fetch one object at once, which costs a download, not correctness.)
KEY_LOCK_SHARDS = 64
#: Unlocked descriptors kept open per lock file for the next holder (more are closed).
KEY_LOCK_POOL = 2
_KEY_LOCK_NAME = re.compile(r"keys(-[0-9]+)?\.lock")

# struct flock (Linux, 64-bit off_t): l_type, l_whence, l_start, l_len, l_pid, padding.
_FLOCK = "@hhqqi4x"


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _load_renameat2() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):  # no renameat2 in this C library
        return None
    c_int, c_str = ctypes.c_int, ctypes.c_char_p
    fn.argtypes = [c_int, c_str, c_int, c_str, ctypes.c_uint]
    fn.restype = c_int
    return fn


_renameat2 = _load_renameat2()
#: False once a filesystem refused RENAME_NOREPLACE (then: look, then rename).
_noreplace_ok = _renameat2 is not None


def rename_noreplace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> bool:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (then False, ``src`` stays).

    One ``renameat2(RENAME_NOREPLACE)``: no look first, and no window in which a file named
    meanwhile is replaced. Where the filesystem does not have it, ``lstat`` then ``rename``,
    as before (a file named in between is replaced). Other errors are raised as
    :class:`OSError`.
    """
    global _noreplace_ok
    s, d = os.fsencode(src), os.fsencode(dst)
    if _noreplace_ok and _renameat2 is not None:
        if _renameat2(_AT_FDCWD, s, _AT_FDCWD, d, _RENAME_NOREPLACE) == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            return False
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), src, None, dst)
        _noreplace_ok = False
    if os.path.lexists(d):
        return False
    os.rename(s, d)
    return True


def worker_dir(tmpdir: str, owner: str, name: str) -> str:
    """``<tmpdir>/<owner>-<name>.worker.d`` (created if needed): where a worker process
    working for ``owner`` writes its temp files. :meth:`TempArea.clean` removes it with its
    files once that owner is gone; :func:`remove_worker_dirs` when its workers are done."""
    path = os.path.join(tmpdir, f"{owner}-{name}{WORKER_DIR_SUFFIX}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    return path


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists (in our pid namespace)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TempFile:
    """A temp file open for writing (``fd``) and locked through a read-only descriptor.

    The lock is held on a separate read-only descriptor so the writable one can be
    closed before ``FS_IOC_ENABLE_VERITY`` (which refuses files open for writing).
    """

    __slots__ = ("fd", "lock_fd", "path")

    def __init__(self, path: str | os.PathLike[str], fd: int, lock_fd: int) -> None:
        self.path = path
        self.fd = fd
        self.lock_fd = lock_fd

    def close_write(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def publish(self, final: str | os.PathLike[str], *, replace: bool = False) -> bool:
        """Rename into ``final``. Without ``replace``, an existing ``final`` wins: the temp
        file is discarded and False returned."""
        self.close_write()
        move = os.rename if replace else rename_noreplace
        try:
            moved = move(self.path, final)
        except FileNotFoundError:
            if self.lock_fd < 0 or os.fstat(self.lock_fd).st_nlink == 0:
                raise  # the temp file itself is gone
            Path(final).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            moved = move(self.path, final)
        if not replace and not moved:  # ``final`` exists: it wins
            self.discard()
            return False
        self._release()
        return True

    def discard(self) -> None:
        """Remove the temp file (idempotent)."""
        self.close_write()
        if self.lock_fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._release()

    def _release(self) -> None:
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1

    def __enter__(self) -> TempFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


class KeyLocks:
    """Exclusive locks named by a byte string, across threads and processes.

    Each lock is an OFD (open file description) write lock on one byte of one of
    :data:`KEY_LOCK_SHARDS` files (``path``, then ``keys-<n>.lock`` beside it; the key's first
    byte picks the file), at an offset taken from the key's first 62 bits (keys are digests:
    distinct keys practically never share an offset, and if they did they would only wait for
    each other). Spreading them over several files keeps each file's list of locks short: the
    kernel walks the whole list to take one more, and a bulk fetch holds thousands. Every
    holder locks through a descriptor of its own (pooled), so threads of one process exclude
    each other too. A dead process's locks vanish with it.
    """

    def __init__(self, path: Path, shards: int = KEY_LOCK_SHARDS) -> None:
        self.path = path
        self._paths = [path] + [
            path.with_name(f"{path.stem}-{n}{path.suffix}") for n in range(1, shards)
        ]
        self._mu = threading.Lock()
        self._free: list[list[int]] = [[] for _ in self._paths]
        self._pid = os.getpid()

    def path_for(self, key: bytes) -> Path:
        """The file holding the lock of ``key``."""
        return self._paths[self._shard(key)]

    def _shard(self, key: bytes) -> int:
        return key[0] % len(self._paths) if key else 0

    def _take_fd(self, shard: int) -> int:
        with self._mu:
            if self._pid != os.getpid():  # forked: the inherited descriptors share our locks
                inherited = [fd for free in self._free for fd in free]
                self._free, self._pid = [[] for _ in self._paths], os.getpid()
                for fd in inherited:  # unlocked in the parent's pool: closing drops nothing
                    os.close(fd)
            if self._free[shard]:
                return self._free[shard].pop()
        path = self._paths[shard]
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _give_fd(self, shard: int, fd: int) -> None:
        with self._mu:
            if self._pid == os.getpid() and len(self._free[shard]) < KEY_LOCK_POOL:
                self._free[shard].append(fd)
                return
        os.close(fd)

    @staticmethod
    def offset(key: bytes) -> int:
        return int.from_bytes(key[:8].ljust(8, b"\0"), "big") >> 2

    @contextlib.contextmanager
    def hold(self, key: bytes) -> Iterator[None]:
        """Hold the lock named ``key`` while the block runs (blocks until acquired)."""
        off = self.offset(key)
        shard = self._shard(key)
        fd = self._take_fd(shard)
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, struct.pack(_FLOCK, fcntl.F_WRLCK, 0, off, 1, 0))
        except BaseException:
            os.close(fd)
            raise
        try:
            yield
        finally:
            try:
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, fcntl.F_UNLCK, 0, off, 1, 0))
            except OSError:
                os.close(fd)  # closing the last descriptor of the OFD drops its locks
            else:
                self._give_fd(shard, fd)

    def try_hold_many(self, keys: Iterable[bytes]) -> tuple[list[int], list[bytes]]:
        """Take, without waiting, the locks of ``keys`` that nobody else holds.

        Returns descriptors of its own (one per file used) and the keys locked through them;
        closing them (:meth:`release_many`) releases them all at once. (Threads of this
        process are not excluded by these: the caller does that.)
        """
        fds: dict[int, int] = {}
        got: list[bytes] = []
        try:
            for key in keys:
                shard = self._shard(key)
                fd = fds.get(shard)
                if fd is None:
                    fd = fds[shard] = self._take_fd(shard)
                lk = struct.pack(_FLOCK, fcntl.F_WRLCK, 0, self.offset(key), 1, 0)
                try:
                    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, lk)
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    continue
                got.append(key)
        except BaseException:
            self.release_many(list(fds.values()))
            raise
        return list(fds.values()), got

    @staticmethod
    def release_many(fds: list[int]) -> None:
        """Release every lock taken through ``fds`` by :meth:`try_hold_many`."""
        for fd in fds:
            os.close(fd)  # the last descriptor of the OFD: its locks go with it

    def close(self) -> None:
        """Close the pooled descriptors (locks in use stay held until released)."""
        with self._mu:
            free, self._free = self._free, [[] for _ in self._paths]
        for fd in (fd for shard in free for fd in shard):
            os.close(fd)


class TempArea:
    """``<repo>/.tmp``: temp files, temp symlinks, lock files and owner files."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._dirs_ok = False
        #: Per-key cross-process locks (see :class:`KeyLocks`).
        self.key_locks = KeyLocks(path / LOCKS_DIR / KEY_LOCKS_FILE)
        self._owner_mu = threading.Lock()
        self._owner: tuple[int, str, int] | None = None  # (pid, id, locked descriptor)

    def ensure_dirs(self) -> None:
        (self.path / LOCKS_DIR).mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.path / OWNERS_DIR).mkdir(mode=0o700, exist_ok=True)
        self._dirs_ok = True

    # -- owners ----------------------------------------------------------------------------

    def owner(self) -> str:
        """This process's owner id in this area (created on first use, see the module doc).

        The owner file stays locked until the process ends (or :meth:`close`); a forked
        child gets an id of its own.
        """
        with self._owner_mu:
            if self._owner is not None and self._owner[0] == os.getpid():
                return self._owner[1]
            if not self._dirs_ok:
                self.ensure_dirs()
            while True:
                oid = secrets.token_hex(16)
                path = self.path / OWNERS_DIR / f"{oid}{OWNER_SUFFIX}"
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                except FileExistsError:
                    continue
                except FileNotFoundError:  # the directory was removed behind our back
                    self.ensure_dirs()
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # a cleaner holds it and is about to remove it
                    os.close(fd)
                    continue
                if os.fstat(fd).st_nlink == 0:  # removed by a cleaner before we locked it
                    os.close(fd)
                    continue
                self._owner = (os.getpid(), oid, fd)
                # Gone with a normal exit; after a crash, the next clean() removes it.
                atexit.register(self.close)
                return oid

    def owner_alive(self, oid: str) -> bool:
        """True while the process that took owner id ``oid`` (of any pid namespace sharing
        this filesystem) lives. A malformed id is nobody's: False."""
        if not _OWNER_ID.fullmatch(oid):
            return False
        with self._owner_mu:
            if self._owner is not None and self._owner[1] == oid:
                return self._owner[0] == os.getpid()
        try:
            fd = os.open(
                self.path / OWNERS_DIR / f"{oid}{OWNER_SUFFIX}",
                os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW,
            )
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def owners(self) -> tuple[list[str], list[str]]:
        """(live owner ids, dead owner ids) of every owner file in the area."""
        live: list[str] = []
        dead: list[str] = []
        try:
            names = os.listdir(self.path / OWNERS_DIR)
        except FileNotFoundError:
            return live, dead
        for name in names:
            oid = name.removesuffix(OWNER_SUFFIX)
            (live if self.owner_alive(oid) else dead).append(oid)
        return live, dead

    def close(self) -> None:
        """Give up this process's owner id (its owner file is removed)."""
        with self._owner_mu:
            owner, self._owner = self._owner, None
        if owner is not None and owner[0] == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path / OWNERS_DIR / f"{owner[1]}{OWNER_SUFFIX}")
            os.close(owner[2])

    def create(self, tag: str = "obj") -> TempFile:
        """A new, empty, locked temp file (mode 0600 until the caller changes it)."""
        if not self._dirs_ok:
            self.ensure_dirs()
        pid = os.getpid()
        while True:
            path = self.path / f"{pid}-{secrets.token_hex(8)}.{tag}.tmp"
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            except FileNotFoundError:  # the temp area was removed behind our back
                self.ensure_dirs()
                continue
            try:
                lock_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # a cleaner removed it already
                os.close(fd)
                continue
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a cleaner holds it and is about to remove it
                os.close(lock_fd)
                os.close(fd)
                continue
            if os.fstat(lock_fd).st_nlink == 0:
                os.close(lock_fd)
                os.close(fd)
                continue
            return TempFile(path, fd, lock_fd)

    def symlink_name(self) -> Path:
        """A fresh name for a temp symlink (tagged with our owner id for :meth:`clean`)."""
        return self.path / f"{self.owner()}-{secrets.token_hex(8)}.lnk"

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Exclusive cross-process lock named ``name`` (blocks until acquired).

        The lock file is removed by its holder on release; a waiter that acquired the
        lock on a file already removed (or replaced) tries again.
        """
        self.ensure_dirs()
        path = self.path / LOCKS_DIR / f"{name}.lock"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    st = None
                if st is not None and st.st_ino == os.fstat(fd).st_ino:
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            os.close(fd)

    def leftovers(self) -> tuple[int, int]:
        """(files, bytes) in the area that belong to dead writers: what :meth:`clean` would
        remove (owner files aside). For fsck: nothing is removed."""
        files = size = 0
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError:
            return 0, 0
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                if e.name.endswith(WORKER_DIR_SUFFIX) and not self._marked_live(e.name):
                    for f in _files_in(e.path):
                        files += 1
                        with contextlib.suppress(OSError):
                            size += f.stat(follow_symlinks=False).st_size
                continue
            if e.is_symlink() or e.name.endswith(WORKER_TEMP_SUFFIX):
                stale = not self._marked_live(e.name)
            else:
                stale = not _locked(Path(e.path))
            if stale:
                files += 1
                with contextlib.suppress(OSError):
                    size += e.stat(follow_symlinks=False).st_size
        return files, size

    def _marked_live(self, name: str) -> bool:
        """A name ``<owner id>-...`` whose owner lives. Names ``<pid>-...`` come from older
        versions: live while such a process exists, but for a day at most (in a container
        that pid is often 1, which always exists)."""
        head = name.split("-", 1)[0]
        if _OWNER_ID.fullmatch(head):
            return self.owner_alive(head)
        if not (head.isdigit() and len(head) < 10 and pid_alive(int(head))):
            return False
        try:
            age = time.time() - os.lstat(self.path / name).st_mtime
        except FileNotFoundError:
            return False
        return age < LEGACY_MARK_MAX_AGE

    def clean(self) -> int:
        """Remove temp files and lock files of dead writers (and the owner files of dead
        processes); return how many temp and lock files were removed."""
        removed = 0
        for oid in self.owners()[1]:
            _remove_if_unlocked(self.path / OWNERS_DIR / f"{oid}{OWNER_SUFFIX}")
        for d in (self.path, self.path / LOCKS_DIR):
            try:
                entries = list(os.scandir(d))
            except FileNotFoundError:
                continue
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    worker = d == self.path and e.name.endswith(WORKER_DIR_SUFFIX)
                    if worker and not self._marked_live(e.name):
                        removed += _remove_dir(e.path)
                    continue
                if d != self.path and _KEY_LOCK_NAME.fullmatch(e.name):
                    continue  # permanent; their range locks are held by live processes
                if e.is_symlink():
                    removed += self._clean_symlink(Path(e.path))
                else:
                    removed += self._clean_file(Path(e.path))
        return removed

    def _clean_file(self, path: Path) -> int:
        # Worker temp files are written unlocked by worker processes (csi.repo.parallel,
        # csi.fetch.bulk), named after the owner they work for: in use while it lives.
        if path.name.endswith(WORKER_TEMP_SUFFIX) and self._marked_live(path.name):
            return 0
        return _remove_if_unlocked(path)

    def _clean_symlink(self, path: Path) -> int:
        if self._marked_live(path.name):
            return 0
        try:
            os.unlink(path)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
            return 0
        return 1


def remove_worker_dirs(tmpdir: str | os.PathLike[str], owner: str) -> int:
    """Remove the worker directories made for ``owner`` in ``tmpdir`` (:func:`worker_dir`;
    ``owner`` may be an owner id with more after it, ``<id>-<pool>``), with their files, once
    those workers have ended; returns how many files were in them."""
    removed = 0
    try:
        entries = list(os.scandir(tmpdir))
    except FileNotFoundError:
        return 0
    for e in entries:
        if e.name.startswith(f"{owner}-") and e.name.endswith(WORKER_DIR_SUFFIX):
            removed += _remove_dir(e.path)
    return removed


def _files_in(path: str) -> list[os.DirEntry[str]]:
    try:
        return [e for e in os.scandir(path) if not e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _remove_dir(path: str) -> int:
    """Remove a worker directory and the files in it (its worker is gone); how many files."""
    removed = 0
    for e in _files_in(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(e.path)
            removed += 1
    with contextlib.suppress(OSError):
        os.rmdir(path)
    return removed


def _locked(path: Path) -> bool:
    """Somebody holds an flock on ``path`` (a temp file's live writer)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return True  # gone, or not ours to judge
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _remove_if_unlocked(path: Path) -> int:
    """Remove ``path`` while holding its lock, if nobody else holds it (1 if removed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return 0
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # a live writer (or owner) holds it
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return 0
        if st.st_ino != os.fstat(fd).st_ino:
            return 0
        os.unlink(path)
        return 1
    finally:
        os.close(fd)
