"""The FUSE data plane: one node-wide mount; each image or composition is a subdirectory.

* :func:`run_daemon` (:mod:`.daemon`) with a :class:`DataPlaneConfig` runs the daemon
  (``composefs-csi dataplane``); :class:`DataPlaneClient` talks to its control socket.
* :func:`mount_command` (:mod:`.mountcmd`) is ``composefs-csi mount``.
* What a view shows: :mod:`.views`; inode numbers: :mod:`.inodes`; object access, the
  descriptor cache and lazy fetching: :mod:`.objects` (its threads: :mod:`.iothreads`);
  the FUSE operations and the two ways of serving them (kernel opens with the patched
  pyfuse3 of ``patches/``, or file handles with stock pyfuse3): :mod:`.fs`; metrics:
  :mod:`.metrics`.
"""

from .client import DataPlaneClient, DataPlaneError, DataPlaneUnavailable
from .config import DEFAULT_MOUNT_OPTIONS, DataPlaneConfig

__all__ = [
    "DEFAULT_MOUNT_OPTIONS",
    "DataPlaneClient",
    "DataPlaneConfig",
    "DataPlaneError",
    "DataPlaneUnavailable",
    "mount_command",
    "run_daemon",
]


def __getattr__(name: str) -> object:
    # The daemon pulls in pyfuse3 and trio; the node plugin only needs the client.
    if name == "run_daemon":
        from .daemon import run_daemon

        return run_daemon
    if name == "mount_command":
        from .mountcmd import mount_command

        return mount_command
    raise AttributeError(name)
