"""Assembling and running the node plugin and the controller (called by ``csi/cli``).

``serve_node(config_path, endpoint, node_id)`` and ``serve_controller(config_path, endpoint)``
block until SIGTERM or SIGINT. ``build_node`` / ``build_controller`` return a started server
object for tests and benchmarks (any data plane or fetcher may be passed in).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from csi.config import DriverConfig, load_config
from csi.fuse.config import mount_source
from csi.store import Store

from .catalog import RepositoryCatalog
from .controller import ControllerService
from .dataplane import DataPlane, FuseDataPlane
from .fetcher import Fetcher, RepositoryFetcher
from .identity import IdentityService
from .interceptor import CsiInterceptor
from .metrics import init_labels, serve_metrics
from .monitor import MountMonitor
from .node import NodeService
from .probes import dataplane_answers, fuse_usable, store_writable
from .proto import csi_pb2_grpc as rpc
from .provisioner import AnnotationReader, Provisioner
from .reconcile import ReconcileReport, reconcile
from .state import NodeState
from .targets import Places
from .volumes import VolumeManager

log = logging.getLogger(__name__)

NODE_STATE_FILE = "csi-node.db"
CONTROLLER_STATE_FILE = "csi-controller.db"


def socket_path(endpoint: str) -> Path:
    """The file of a ``unix:///path`` (or ``unix:/path``) endpoint."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://") :]
    elif endpoint.startswith("unix:"):
        path = endpoint[len("unix:") :]
    else:
        raise ValueError(f"endpoint {endpoint!r} is not unix:///path")
    if not path.startswith("/"):
        raise ValueError(f"endpoint {endpoint!r} needs an absolute path")
    return Path(path)


def _prepare_socket(endpoint: str) -> tuple[Path, str]:
    path = socket_path(endpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()  # stale socket of a previous run
        else:
            raise FileExistsError(f"{path} exists and is not a socket")
    return path, f"unix://{path}"


def _grpc_server(max_workers: int) -> grpc.Server:
    return grpc.server(
        ThreadPoolExecutor(max_workers, thread_name_prefix="csi-grpc"),
        interceptors=[CsiInterceptor()],
        options=[("grpc.max_receive_message_length", 4 << 20)],
        maximum_concurrent_rpcs=max_workers * 4,
    )


@dataclass
class NodePlugin:
    server: grpc.Server
    manager: VolumeManager
    store: Store
    state: NodeState
    socket: Path
    reconcile_report: ReconcileReport
    monitor: MountMonitor
    _closers: list[Any] = field(default_factory=list)

    def stop(self, grace: float | None = 5.0) -> None:
        self.monitor.stop()
        self.server.stop(grace).wait()
        self.manager.close()
        for c in self._closers:
            c()
        self.state.close()
        self.store.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()


def build_node(
    config: DriverConfig,
    endpoint: str,
    node_id: str,
    *,
    dataplane: DataPlane | None = None,
    fetcher: Fetcher | None = None,
    state_path: Path | None = None,
    max_workers: int = 64,
    check_fuse: bool = True,
) -> NodePlugin:
    """Open the store and the state, reconcile, and start serving on ``endpoint``."""
    if not node_id:
        raise ValueError("a node id is needed (the Kubernetes node name)")
    store = Store(
        config.store.path,
        size_cap=config.store.size_cap,
        high_watermark=config.store.high_watermark,
        low_watermark=config.store.low_watermark,
    )
    closers: list[Any] = []
    if fetcher is None:
        rf = RepositoryFetcher(config.repositories, store)
        closers.append(rf.close)
        fetcher = rf
    if dataplane is None:
        dataplane = FuseDataPlane(config.dataplane.socket)
    state = NodeState(state_path or config.store.path / NODE_STATE_FILE)
    manager = VolumeManager(
        store=store,
        dataplane=dataplane,
        fetcher=fetcher,
        state=state,
        repositories=list(config.repositories),
        default_repository=config.default_repository,
        rpc_wait=config.rpc_wait,
        places=Places(
            config.node.kubelet_dir,
            forbidden=[config.store.path, config.dataplane.mountpoint],
        ),
        mount_source=mount_source(config.dataplane.mountpoint),
        dataplane_mountpoint=str(config.dataplane.mountpoint),
        max_fetch_jobs=max(1, config.fetch_concurrency // 2),
    )
    report = reconcile(manager)
    log.info(
        "reconciled: %d healthy, %d repaired, %d cleaned, %d failed, %d orphan views, "
        "%d orphan leases",
        report.healthy,
        len(report.repaired),
        len(report.cleaned),
        len(report.failed),
        report.orphan_views,
        report.orphan_leases,
    )
    monitor = MountMonitor(manager, interval=config.node.repair_interval or 2.0)
    checks = [store_writable(config.store.path), dataplane_answers(dataplane), monitor.check]
    if check_fuse:
        checks.insert(1, fuse_usable())
    server = _grpc_server(max_workers)
    init_labels(["Identity", "Node"])
    identity = IdentityService(controller=config.controller_enabled, checks=checks)
    rpc.add_IdentityServicer_to_server(identity, server)
    rpc.add_NodeServicer_to_server(NodeService(manager, node_id), server)
    sock, address = _prepare_socket(endpoint)
    server.add_insecure_port(address)
    server.start()
    os.chmod(sock, 0o660)
    if config.node.repair_interval > 0:
        monitor.start()
    return NodePlugin(server, manager, store, state, sock, report, monitor, closers)


@dataclass
class ControllerPlugin:
    server: grpc.Server
    provisioner: Provisioner
    socket: Path
    _closers: list[Any] = field(default_factory=list)

    def stop(self, grace: float | None = 5.0) -> None:
        self.server.stop(grace).wait()
        for c in self._closers:
            c()
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()


class _InClusterAnnotations:
    """Connects to the API server on first use (only StorageClasses that ask need it)."""

    def __init__(self) -> None:
        self._reader: AnnotationReader | None = None
        self._mu = threading.Lock()

    def image(self, namespace: str, name: str) -> str:
        from .errors import precondition
        from .k8s import PVCAnnotations

        with self._mu:
            if self._reader is None:
                try:
                    self._reader = PVCAnnotations.in_cluster()
                except Exception as e:
                    raise precondition(f"no in-cluster Kubernetes API access: {e}") from None
            reader = self._reader
        return reader.image(namespace, name)


def build_controller(
    config: DriverConfig,
    endpoint: str,
    *,
    annotations: AnnotationReader | None = None,
    state_path: Path | None = None,
    max_workers: int = 16,
) -> ControllerPlugin:
    """Start the controller: Identity (with CONTROLLER_SERVICE) and Controller."""
    store = Store(config.store.path, size_cap=config.store.size_cap)
    catalog = RepositoryCatalog(config.repositories, store)
    provisioner = Provisioner(
        catalog=catalog,
        repositories=list(config.repositories),
        default_repository=config.default_repository,
        annotations=annotations if annotations is not None else _InClusterAnnotations(),
        state_path=state_path,
    )
    server = _grpc_server(max_workers)
    checks = [store_writable(config.store.path)]
    init_labels(["Identity", "Controller"])
    rpc.add_IdentityServicer_to_server(IdentityService(controller=True, checks=checks), server)
    rpc.add_ControllerServicer_to_server(ControllerService(provisioner), server)
    sock, address = _prepare_socket(endpoint)
    server.add_insecure_port(address)
    server.start()
    os.chmod(sock, 0o660)
    return ControllerPlugin(server, provisioner, sock, [catalog.close, store.close])


def _wait_for_signal() -> None:
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    stop.wait()


def serve_node(
    config_path: str | Path,
    endpoint: str,
    node_id: str,
    *,
    state_path: Path | None = None,
    max_workers: int = 64,
) -> None:
    """Run the node plugin until SIGTERM/SIGINT (metrics on the configured address)."""
    config = load_config(config_path)
    plugin = build_node(config, endpoint, node_id, state_path=state_path, max_workers=max_workers)
    where = serve_metrics(config.metrics_address)
    log.info("node plugin %s serving on %s (metrics: %s)", node_id, endpoint, where)
    try:
        _wait_for_signal()
    finally:
        plugin.stop()


def serve_controller(
    config_path: str | Path,
    endpoint: str,
    *,
    state_path: Path | None = None,
    max_workers: int = 16,
) -> None:
    """Run the controller until SIGTERM/SIGINT (metrics on the configured address)."""
    config = load_config(config_path)
    plugin = build_controller(config, endpoint, state_path=state_path, max_workers=max_workers)
    where = serve_metrics(config.metrics_address)
    log.info("controller serving on %s (metrics: %s)", endpoint, where)
    try:
        _wait_for_signal()
    finally:
        plugin.stop()
