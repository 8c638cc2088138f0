"""Configuration of the FUSE data plane daemon (plain data, no argument parsing)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from csi.fetch.config import RepositoryConfig

#: Mount options used unless the configuration says otherwise.
DEFAULT_MOUNT_OPTIONS: tuple[str, ...] = ("ro", "nosuid", "nodev", "allow_other")

#: The mount's subtype (``findmnt`` shows ``fuse.composefs-csi``) and its source's prefix.
FSNAME = "composefs-csi"


def mount_source(mountpoint: str | os.PathLike[str]) -> str:
    """The source the data plane serving ``mountpoint`` gives its mount (and so every bind of
    a view): ``composefs-csi:<12 hex of the mountpoint's SHA-256>``. The node plugin knows
    its own mounts by it: another driver's FUSE mounts, or another install's, are not
    touched."""
    key = hashlib.sha256(os.fsencode(os.path.abspath(mountpoint))).hexdigest()[:12]
    return f"{FSNAME}:{key}"


@dataclass(frozen=True)
class DataPlaneConfig:
    """Everything :func:`csi.fuse.daemon.run_daemon` needs.

    ``repositories`` maps an admin-given repository name to its base URL (or local path); lazy
    views fetch missing objects from the repository named when they are added, or from
    ``default_repository``. ``metrics_address`` is ``"host:port"`` for the Prometheus endpoint
    (``None``: no endpoint).
    """

    mountpoint: Path
    control_socket: Path
    store: Path
    repositories: Mapping[str, str | RepositoryConfig] = field(default_factory=dict)
    default_repository: str | None = None
    mount_options: tuple[str, ...] = DEFAULT_MOUNT_OPTIONS
    #: BDI read-ahead of the mount in KiB, written after mounting (0: leave the kernel default).
    read_ahead_kb: int = 16384
    #: Directory entries (with attributes) kept ready for readdir replies, all views together.
    listing_cache_entries: int = 100_000
    #: Idle object file descriptors kept open (those in use are never closed).
    fd_cache_size: int = 1024
    #: Threads doing file I/O (pread, open) at once (:class:`csi.fuse.iothreads.IoThreads`).
    io_threads: int = 32
    #: Objects fetched at once for reads waiting on a lazy view's missing object.
    demand_fetch_threads: int = 16
    #: Objects fetched at once in the background for lazy views.
    prefetch_threads: int = 4
    #: A read waiting for a lazily fetched object fails with EIO after this many seconds.
    fetch_timeout: float = 600.0
    #: Kernel entry/attribute cache lifetime for image content (immutable: very long).
    cache_timeout: float = 86400.0 * 365
    #: Let the kernel open files and directories itself and keep their contents and listings
    #: cached (needs pyfuse3 with the inode_as_fh patch; without it, or when False, every
    #: open and listing is a request to the daemon).
    kernel_opens: bool = True
    #: When a directory's files are read in turn, up to this many of the next small files are
    #: read ahead into the page cache (:mod:`csi.fuse.readahead`, :mod:`csi.fuse.pagepush`);
    #: 0 turns it off.
    readahead_files: int = 64
    metrics_address: str | None = None
    #: Seconds to wait for the kernel to release the mount at shutdown before detaching it.
    unmount_timeout: float = 10.0
