"""Where the node plugin may act, and getting there without following anything.

kubelet gives the node plugin paths: the target of a publish, the staging path of a stage, the
volume path of a stats call. The plugin runs as root and mounts there, so a path is only
accepted when it lies under kubelet's own directory (``node.kubelet_dir``, default
``/var/lib/kubelet``), outside the driver's own directories, with no symlink anywhere below
the kubelet directory (:class:`Places`). A target is then reached component by component with
``O_NOFOLLOW`` (:meth:`Places.open_target`), and mounted through the descriptor that walk
produced, so a symlink swapped in on the way cannot redirect a mount to ``/etc``.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import CsiError, invalid, not_found, precondition

#: Linux limits: a whole path, and one component.
PATH_MAX = 4096
NAME_MAX = 255

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class OpenedTarget:
    """A target directory reached safely: ``fd`` (O_PATH) is the directory (or what is mounted
    on it), ``parent_fd`` its parent, ``created`` whether this call made the directory."""

    path: str
    name: str
    fd: int
    parent_fd: int
    created: bool

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.parent_fd)

    def reopen(self) -> int:
        """A new O_PATH descriptor of what is at the target now (after a mount: its root)."""
        return os.open(self.name, _DIR_FLAGS, dir_fd=self.parent_fd)


class Places:
    """The directories the node plugin may use for targets and staging paths."""

    def __init__(self, kubelet_dir: Path, forbidden: list[Path]) -> None:
        given = os.path.normpath(os.path.abspath(kubelet_dir))
        #: kubelet's directory as kubelet names it (possibly through a symlink, which the admin
        #: set up) and as the kernel does (mountinfo shows this one).
        self.kubelet_dir = given
        self.kubelet_real = os.path.realpath(given)
        self.forbidden = [os.path.realpath(p) for p in forbidden]

    def _check(self, path: str, what: str) -> str:
        """``path`` as the kernel names it, if it is acceptable: absolute, not too long,
        under kubelet's directory, not inside the driver's own directories."""
        if not path.startswith("/"):
            raise invalid(f"{what} {path[:200]!r} must be an absolute path")
        if len(path.encode()) >= PATH_MAX or any(
            len(c.encode()) > NAME_MAX for c in path.split("/")
        ):
            raise invalid(f"{what} is too long ({len(path)} characters): {path[:100]!r}...")
        if "\0" in path:
            raise invalid(f"{what} {path[:200]!r} contains NUL")
        norm = os.path.normpath(path)
        for base in (self.kubelet_dir, self.kubelet_real):
            if norm.startswith(base + "/"):
                real = self.kubelet_real + norm[len(base) :]
                break
        else:
            raise invalid(
                f"{what} {norm[:200]!r} is outside kubelet's directory {self.kubelet_dir} "
                "(node.kubelet_dir in the driver's configuration, kubeletDir in the chart): "
                "this plugin acts only there"
            )
        for f in self.forbidden:
            if real == f or real.startswith(f + "/") or f.startswith(real + "/"):
                raise invalid(f"{what} {norm[:200]!r} is one of the driver's own directories")
        return real

    def target(self, path: str) -> str:
        """A publish target (or staging path) as the kernel names it; INVALID_ARGUMENT if it
        is not one this plugin will act on."""
        return self._check(path, "target path")

    def staging(self, path: str) -> str:
        return self._check(path, "staging path")

    def volume_path(self, path: str) -> str:
        """A NodeGetVolumeStats path: NOT_FOUND (the spec's code) for anything that cannot
        be a volume of ours: relative, outside kubelet's directory, or absent."""
        try:
            real = self._check(path, "volume path")
        except CsiError as e:
            raise not_found(e.message) from None
        if not os.path.lexists(real):
            raise not_found(f"volume path {path[:200]!r} does not exist")
        return real

    def _walk_parent(self, path: str) -> tuple[int, str]:
        """(O_PATH descriptor of the parent directory of ``path``, last component), reached
        from kubelet's directory without following a symlink. FAILED_PRECONDITION if a
        component is missing, a symlink or not a directory."""
        rel = path[len(self.kubelet_real) + 1 :]
        parts = rel.split("/")
        try:
            fd = os.open(self.kubelet_real, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise precondition(f"kubelet's directory {self.kubelet_real}: {e.strerror}") from None
        for i, comp in enumerate(parts[:-1]):
            try:
                nxt = os.open(comp, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                os.close(fd)
                where = os.path.join(self.kubelet_real, *parts[: i + 1])
                if e.errno == errno.ENOENT:
                    raise precondition(
                        f"the parent directory of {path} does not exist ({where} is missing; "
                        "the container orchestrator creates it before publishing)"
                    ) from None
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise precondition(
                        f"{where} is a symlink or not a directory: refusing to follow it"
                    ) from None
                raise precondition(f"cannot reach {where}: {e.strerror}") from None
            os.close(fd)
            fd = nxt
        return fd, parts[-1]

    def open_target(self, path: str, *, create: bool) -> OpenedTarget:
        """Reach the directory at ``path`` (a :meth:`target` result), creating it if it is
        missing and ``create``. FAILED_PRECONDITION for a symlink, a file, or a parent where a
        directory cannot be made (read-only: inside another volume, say)."""
        parent, name = self._walk_parent(path)
        created = False
        try:
            while True:
                try:
                    fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
                    break
                except OSError as e:
                    if e.errno == errno.ENOENT and create:
                        try:
                            os.mkdir(name, 0o750, dir_fd=parent)
                            created = True
                        except FileExistsError:
                            pass  # made meanwhile: open it
                        except OSError as e2:
                            raise self._mkdir_error(path, e2) from None
                        continue
                    raise self._open_error(path, parent, name, e) from None
        except BaseException:
            os.close(parent)
            raise
        return OpenedTarget(path, name, fd, parent, created)

    def remove_dir(self, path: str) -> None:
        """Remove the (empty) directory at ``path``, reached without following links; absent
        is fine. OSError if it is not empty (or is a mount point)."""
        try:
            parent, name = self._walk_parent(path)
        except CsiError:
            return  # a parent is gone (or not a plain directory): nothing of ours to remove
        try:
            os.rmdir(name, dir_fd=parent)
        except FileNotFoundError:
            pass
        finally:
            os.close(parent)

    @staticmethod
    def _mkdir_error(path: str, e: OSError) -> CsiError:
        if e.errno == errno.EROFS:
            return precondition(
                f"cannot create target {path}: its parent is on a read-only filesystem "
                "(inside another volume?)"
            )
        return precondition(f"cannot create target {path}: {e.strerror}")

    @staticmethod
    def _open_error(path: str, parent: int, name: str, e: OSError) -> CsiError:
        if e.errno == errno.ENOENT:
            return not_found(f"{path} does not exist")
        try:
            st = os.lstat(name, dir_fd=parent)
        except OSError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            return precondition(f"target {path} is a symlink: refusing to follow it")
        if st is not None and not stat.S_ISDIR(st.st_mode):
            return precondition(f"target {path} exists and is not a directory")
        return precondition(f"cannot open target {path}: {e.strerror}")
