"""The data plane daemon: one node-wide FUSE mount, views managed over the control socket.

:func:`run_daemon` mounts, serves until SIGINT/SIGTERM (or until the mount goes away), then
unmounts. It is a separate process from the CSI node plugin, so restarting the plugin leaves
every published volume (a bind mount of one view's subdirectory) untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from csi.image.errors import FormatError
from csi.image.reader import Image
from csi.limits import raise_open_files_limit
from csi.repo import layout

from . import metrics, mounting
from .config import FSNAME, DataPlaneConfig, mount_source
from .control import ControlError, get_bool, get_str, serve_connection
from .fs import DataPlaneFS
from .inodes import MAX_LAYERS, ROOT_INO
from .objects import ObjectSource, ObjectStoreAccess
from .sources import SourceRegistry, StoreHandle
from .views import CompositionView, ImageView, ListingCache, View

log = logging.getLogger(__name__)


def view_key(digests: Sequence[bytes], composition: bool) -> str:
    """The subdirectory name of a view: the image digest, or ``c-`` + SHA-256 of the layers."""
    if not composition:
        return digests[0].hex()
    return "c-" + hashlib.sha256(b"".join(digests)).hexdigest()


def fuse_options(config: DataPlaneConfig) -> set[str]:
    opts = {f"fsname={mount_source(config.mountpoint)}", f"subtype={FSNAME}", "default_permissions"}
    opts.update(config.mount_options)
    return opts


def open_image(store: Path, digest: bytes) -> Image:
    """Open and fully validate an image of the store (blocking)."""
    path = store / layout.IMAGES_DIR / digest.hex()
    try:
        img = Image.open(path)
    except FileNotFoundError:
        raise ControlError("not_found", f"image {digest.hex()} is not in the store") from None
    except FormatError as e:
        raise ControlError("invalid_image", f"image {digest.hex()}: {e}") from None
    try:
        img.validate()
    except FormatError as e:
        img.close()
        raise ControlError("invalid_image", f"image {digest.hex()}: {e}") from None
    return img


def image_objects(store: Path, digests: Sequence[bytes]) -> dict[bytes, int]:
    """Every object the images reference, with the largest size they give it (blocking;
    opens its own mappings)."""
    out: dict[bytes, int] = {}
    for d in digests:
        with Image.open(store / layout.IMAGES_DIR / d.hex()) as img:
            for obj, size in img.object_sizes().items():
                out[obj] = max(size, out.get(obj, 0))
    return out


class DataPlane:
    """The daemon's state: the filesystem, its views and the control operations."""

    def __init__(
        self,
        config: DataPlaneConfig,
        *,
        sources: SourceRegistry | None = None,
    ) -> None:
        self.config = config
        self.store_root = Path(config.store)
        self.store = StoreHandle(self.store_root)
        store_prefix = os.path.join(os.fspath(self.store_root), "")
        self.sources = sources or SourceRegistry(
            config.repositories, self.store, config.default_repository
        )
        self.objects = ObjectStoreAccess(
            # A string, not a Path: built for every read of a file not read before.
            lambda d: f"{store_prefix}{layout.object_relpath(d)}",
            fd_cache_size=config.fd_cache_size,
            io_threads=config.io_threads,
            demand_fetch_threads=config.demand_fetch_threads,
            prefetch_threads=config.prefetch_threads,
            fetch_timeout=config.fetch_timeout,
        )
        self.fs = DataPlaneFS(
            self.objects,
            timeout=config.cache_timeout,
            kernel_opens=config.kernel_opens,
            readahead_files=config.readahead_files,
        )
        metrics.init_labels()
        self.listings = ListingCache(config.listing_cache_entries)
        self._nursery: trio.Nursery | None = None
        self._adding: dict[str, trio.Lock] = {}
        self._instance_lock: int | None = None

    # -- mount ---------------------------------------------------------------------------------

    def mount(self) -> None:
        mp = Path(self.config.mountpoint)
        self._instance_lock = mounting.instance_lock(self.store_root, mp)
        mounting.clear_stale_mount(mp)
        mp.mkdir(parents=True, exist_ok=True)
        pyfuse3.init(self.fs, os.fspath(mp), fuse_options(self.config))
        self.fs.mounted = True
        log.info("mounted %s at %s", FSNAME, mp)

    def unmount(self) -> None:
        if self.fs.mounted:
            self.fs.mounted = False
            self.fs.pages.stop()  # its threads use the session that close() ends
            try:
                pyfuse3.close(unmount=True)
            finally:
                # libfuse unmounts lazily when it cannot unmount cleanly; make sure.
                with contextlib.suppress(OSError):
                    if mounting.is_mounted(self.config.mountpoint):
                        mounting.umount(self.config.mountpoint, detach=True)
        self.fs.close_all()
        self.sources.close()
        self.store.close()
        if self._instance_lock is not None:
            os.close(self._instance_lock)
            self._instance_lock = None

    def serve_single(
        self, digests: list[bytes], *, composition: bool, source: ObjectSource | None
    ) -> View:
        """Make the mount root show one view (``composefs-csi mount``); call before mount()."""
        imgs = [open_image(self.store_root, d) for d in digests]
        view: View
        kw: dict[str, Any] = {"timeout": self.fs.timeout, "root_ino": ROOT_INO}
        if composition:
            view = CompositionView(view_key(digests, True), 0, digests, imgs, **kw)
        else:
            view = ImageView(
                view_key(digests, False), 0, digests[0], imgs[0], listings=self.listings, **kw
            )
        view.lazy_source = source
        view.holders.add("local")
        self.fs.set_single(view)
        return view

    # -- serving -------------------------------------------------------------------------------

    async def serve(self, *, control: bool = True) -> None:
        """Serve FUSE (and the control socket) until a signal or the mount goes away."""
        listener = await self._listen() if control else None
        async with trio.open_nursery() as n:
            self._nursery = n
            self.objects.start(n)
            n.start_soon(self._signals)
            if self.config.read_ahead_kb > 0:
                n.start_soon(self._tune_read_ahead)
            if listener is not None:
                n.start_soon(trio.serve_listeners, self._connection, [listener])
            if self.fs.single is not None and self.fs.single.lazy_source is not None:
                self._start_prefetch(self.fs.single, self.fs.single.lazy_source)
            await pyfuse3.main(min_tasks=4, max_tasks=256)
            log.info("FUSE session ended")
            n.cancel_scope.cancel()

    async def _tune_read_ahead(self) -> None:
        # The kernel caps read-ahead at what the FUSE INIT exchange agreed, so the BDI value
        # is raised once INIT is done: a stat of the root only completes after it.
        mp = Path(self.config.mountpoint)
        await trio.to_thread.run_sync(os.stat, mp)
        await trio.to_thread.run_sync(mounting.set_read_ahead, mp, self.config.read_ahead_kb)

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
            async for signum in sigs:
                log.info("signal %d: shutting down", signum)
                pyfuse3.terminate()
                return

    async def _listen(self) -> trio.SocketListener:
        path = Path(self.config.control_socket)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(os.fspath(path))
            except OSError:
                path.unlink()  # stale socket of a dead daemon
            else:
                raise RuntimeError(f"another data plane is listening on {path}")
            finally:
                probe.close()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            await sock.bind(os.fspath(path))
        finally:
            os.umask(old)
        sock.listen(128)
        return trio.SocketListener(sock)

    async def _connection(self, stream: trio.SocketStream) -> None:
        await serve_connection(
            stream,
            {
                "ping": self.ping,
                "add_view": self.add_view,
                "remove_view": self.remove_view,
                "list_views": self.list_views,
                "status": self.status,
            },
        )

    # -- control operations --------------------------------------------------------------------

    def _path(self, view: View) -> str:
        return os.fspath(Path(self.config.mountpoint) / view.key)

    async def ping(self, req: dict[str, Any]) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "mountpoint": os.fspath(self.config.mountpoint),
            "views": len(self.fs.views),
        }

    async def add_view(self, req: dict[str, Any]) -> dict[str, Any]:
        images = req.get("images")
        if not isinstance(images, list) or not images or len(images) > MAX_LAYERS:
            raise ControlError(
                "invalid_argument", f"'images' must list 1..{MAX_LAYERS} image digests"
            )
        try:
            digests = [layout.parse_hex_digest(str(h)) for h in images]
        except Exception as e:
            raise ControlError("invalid_argument", str(e)) from None
        holder = get_str(req, "holder")
        assert holder is not None
        lazy = bool(get_bool(req, "lazy", False))
        repository = get_str(req, "repository", optional=True)
        composition = get_bool(req, "composition", None)
        if composition is None:
            composition = len(digests) > 1
        if not composition and len(digests) != 1:
            raise ControlError("invalid_argument", "several images make a composition")
        source: ObjectSource | None = None
        if lazy:
            try:
                source = self.sources.get(repository)
            except KeyError:
                raise ControlError(
                    "invalid_argument",
                    f"lazy view needs a configured repository (got {repository!r}; "
                    f"configured: {self.sources.names()})",
                ) from None
        key = view_key(digests, composition)
        lock = self._adding.setdefault(key, trio.Lock())
        async with lock:
            view = self.fs.views.get(key)
            created = view is None
            if view is None:
                view = await self._create(key, digests, composition)
            view.holders.add(holder)
            if source is not None and view.lazy_source is None:
                view.lazy_source = source
                view.repository = repository or self.sources.default
                self._start_prefetch(view, source)
        if lock.statistics().tasks_waiting == 0:
            self._adding.pop(key, None)
        self.fs._update_view_metrics()
        log.info("view %s: holder %s added (%d holders)", key, holder, len(view.holders))
        return {"key": key, "path": self._path(view), "created": created}

    async def _create(self, key: str, digests: list[bytes], composition: bool) -> View:
        def load() -> list[Image]:
            opened: list[Image] = []
            try:
                for d in digests:
                    opened.append(open_image(self.store_root, d))
            except BaseException:
                for img in opened:
                    img.close()
                raise
            return opened

        imgs = await trio.to_thread.run_sync(load)
        slot = self.fs.allocate_slot()
        view: View
        if composition:
            view = CompositionView(key, slot, digests, imgs, timeout=self.fs.timeout)
        else:
            view = ImageView(
                key, slot, digests[0], imgs[0], timeout=self.fs.timeout, listings=self.listings
            )
        self.fs.attach(view)
        await trio.to_thread.run_sync(self.fs.invalidate_root)
        return view

    def _start_prefetch(self, view: View, source: ObjectSource) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._prefetch, view, source)

    async def _prefetch(self, view: View, source: ObjectSource) -> None:
        with trio.CancelScope() as scope:
            view.prefetch_scope = scope
            try:
                sizes = await trio.to_thread.run_sync(image_objects, self.store_root, view.digests)
                await self.objects.prefetch(sizes, source, view.progress)
                log.info("view %s: prefetch %s", view.key, view.progress.state)
            except Exception as e:
                view.progress.state = "failed"
                view.progress.last_error = str(e)
                log.exception("view %s: prefetch failed: %s", view.key, e)

    async def remove_view(self, req: dict[str, Any]) -> dict[str, Any]:
        key = get_str(req, "key")
        holder = get_str(req, "holder")
        assert key is not None and holder is not None
        view = self.fs.views.get(key)
        if view is None:
            return {"removed": False, "holders": 0}
        view.holders.discard(holder)
        if view.holders:
            self.fs._update_view_metrics()
            return {"removed": False, "holders": len(view.holders)}
        if view.prefetch_scope is not None:
            view.prefetch_scope.cancel()
        self.fs.detach(view)
        await trio.to_thread.run_sync(self.fs.forget_entry, view)
        await trio.to_thread.run_sync(self.fs.invalidate_root)
        log.info("view %s removed", key)
        return {"removed": True, "holders": 0}

    def _describe(self, view: View) -> dict[str, Any]:
        return {
            "key": view.key,
            "path": self._path(view),
            "kind": view.kind,
            "images": [d.hex() for d in view.digests],
            "holders": sorted(view.holders),
            "lazy": view.lazy_source is not None,
            "repository": view.repository,
            "open_files": view.open_files,
        }

    async def list_views(self, req: dict[str, Any]) -> list[dict[str, Any]]:
        return [self._describe(v) for _, v in sorted(self.fs.views.items())]

    async def status(self, req: dict[str, Any]) -> dict[str, Any]:
        key = get_str(req, "key", optional=True)
        want_objects = bool(get_bool(req, "objects", False))
        views = [self.fs.views[key]] if key in self.fs.views else []
        if key is None:
            views = [v for _, v in sorted(self.fs.views.items())]
        out = []
        for v in views:
            d = self._describe(v)
            d["progress"] = v.progress.as_dict()
            if want_objects:
                d["missing"] = await trio.to_thread.run_sync(self._count_missing, v.digests)
            out.append(d)
        return {"views": out, "object_fds": len(self.objects.fds)}

    def _count_missing(self, digests: list[bytes]) -> int:
        objs = image_objects(self.store_root, digests)
        return sum(1 for d in objs if not self.objects.has_object(d))


def start_metrics_server(address: str) -> None:
    from prometheus_client import start_http_server

    from csi.metrics import REGISTRY

    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host or "0.0.0.0", registry=REGISTRY)


def run_daemon(config: DataPlaneConfig) -> None:
    """Mount and serve until SIGINT/SIGTERM; always unmounts before returning."""
    raise_open_files_limit()
    plane = DataPlane(config)
    plane.mount()
    # After the mount: the chart's readiness probe is this port, and ready means mounted.
    if config.metrics_address:
        start_metrics_server(config.metrics_address)
    try:
        trio.run(plane.serve)
    finally:
        plane.unmount()
        with contextlib.suppress(FileNotFoundError):
            Path(config.control_socket).unlink()
        log.info("unmounted %s", config.mountpoint)


__all__ = ["DataPlane", "run_daemon", "view_key"]
