"""``composefs-csi mount REF MOUNTPOINT --repository URL --store DIR [--lazy]`` as a function.

Mounts one image for local use, in the foreground: the image is fetched into the store (all its
objects first, or only the image with ``lazy``: objects then arrive on first read and in the
background), the mount root shows the image, and SIGINT/SIGTERM unmount cleanly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import trio

from csi.fetch import RepositoryClient, RepositoryConfig
from csi.limits import raise_open_files_limit
from csi.store import Store

from .config import DEFAULT_MOUNT_OPTIONS, DataPlaneConfig
from .daemon import DataPlane
from .sources import RepositoryObjectSource, StoreHandle

log = logging.getLogger(__name__)


def mount_command(
    ref: str,
    mountpoint: Path,
    repository: str | Sequence[str],
    store_dir: Path,
    *,
    lazy: bool = False,
    mount_options: tuple[str, ...] = DEFAULT_MOUNT_OPTIONS,
    read_ahead_kb: int = 1024,
    allow_plain_http: bool = False,
) -> int:
    """Fetch and mount ``ref`` at ``mountpoint`` until interrupted; returns an exit status.

    ``repository`` is a URL or path, or several (mirrors, tried in order). Plain ``http://``
    is refused unless ``allow_plain_http``. Raises :class:`csi.fetch.FetchError` when the
    image cannot be fetched.
    """
    urls = (repository,) if isinstance(repository, str) else tuple(repository)
    config = RepositoryConfig(name="default", urls=urls, allow_plain_http=allow_plain_http)
    mountpoint = Path(mountpoint).absolute()
    store_dir = Path(store_dir).absolute()
    holder = f"mount:{mountpoint}"
    client = RepositoryClient(config)
    try:
        with Store(store_dir) as store:
            digest = client.fetch_image(ref, store, objects=not lazy).image
            store.touch(digest)
            store.lease(holder, [digest])
        log.info("image %s (%s)", digest.hex(), ref)
        raise_open_files_limit()
        plane = DataPlane(
            DataPlaneConfig(
                mountpoint=mountpoint,
                control_socket=mountpoint / ".control",  # not used: no control socket
                store=store_dir,
                mount_options=mount_options,
                read_ahead_kb=read_ahead_kb,
            )
        )
        source = RepositoryObjectSource(client, plane.store) if lazy else None
        plane.serve_single([digest], composition=False, source=source)
        plane.mount()
        try:
            trio.run(lambda: plane.serve(control=False))
        finally:
            plane.unmount()
            with Store(store_dir) as store:
                store.release(holder)
        return 0
    finally:
        client.close()


__all__ = ["StoreHandle", "mount_command"]
