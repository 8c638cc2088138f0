"""Helpers for the CSI server tests: repositories of generated images, the real FUSE data plane
in a subprocess, a node plugin (in-process or as a subprocess) and gRPC stubs over its socket."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi.config import DriverConfig, config_from_dict
from csi.fuse.client import DataPlaneClient, DataPlaneUnavailable
from csi.image.writer import write_image
from csi.repo import Repository
from csi.server import build_node
from csi.server.dataplane import FuseDataPlane
from csi.server.proto import csi_pb2 as pb
from csi.server.proto import csi_pb2_grpc as rpc
from tests.support.gentree import make_disk_tree, random_spec, spec_to_tree, write_spec_objects

REPO_ROOT = Path(__file__).resolve().parent.parent

#: What kubelet puts into volume_context for an inline volume (podInfoOnMount: true).
POD_INFO = {
    "csi.storage.k8s.io/pod.name": "web-0",
    "csi.storage.k8s.io/pod.namespace": "default",
    "csi.storage.k8s.io/pod.uid": "0b3c5ad2-8a3e-4f43-9d77-5d8a2c1c2d10",
    "csi.storage.k8s.io/serviceAccount.name": "default",
    "csi.storage.k8s.io/ephemeral": "true",
}

MOUNT_CAP = pb.VolumeCapability(
    mount=pb.VolumeCapability.MountVolume(),
    access_mode=pb.VolumeCapability.AccessMode(
        mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
    ),
)


def fuse_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mounts)"
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as e:
        return f"/dev/fuse unusable: {e.strerror}"
    os.close(fd)
    return None


@dataclass(frozen=True)
class RepoImage:
    name: str
    digest: bytes
    source: Path
    objects: int

    @property
    def ref(self) -> str:
        return "sha256:" + self.digest.hex()


def make_image(repo: Repository, sources: Path, name: str, seed: int, n: int = 60) -> RepoImage:
    """A random tree (files of many sizes, dirs, symlinks, hard links, xattrs) as an image in
    ``repo`` with ref ``name``; its source directory under ``sources``."""
    spec = random_spec(seed, n, privileged=False)
    src = make_disk_tree(sources / name, spec)
    count = write_spec_objects(spec, repo.root / "objects")
    digest = repo.add_image(write_image(spec_to_tree(spec)))
    repo.set_ref(name, digest)
    return RepoImage(name, digest, src, count)


def fuse_repo(
    tmp_path_factory: pytest.TempPathFactory, count: int, *, n: int = 60
) -> tuple[Path, list[RepoImage]]:
    """A repository of ``count`` images of ``n`` files for tests that run the node plugin with
    the real data plane: (its root, the images). Skips the test where FUSE cannot run."""
    problem = fuse_problem()
    if problem:
        pytest.skip(problem)
    root = tmp_path_factory.mktemp("repo")
    return root / "repo", make_repo(root, count, n=n)


def make_repo(root: Path, count: int, *, n: int = 60, seed0: int = 1000) -> list[RepoImage]:
    repo = Repository(root / "repo", create=True)
    sources = root / "sources"
    sources.mkdir(exist_ok=True)
    return [make_image(repo, sources, f"img{i}", seed0 + i, n) for i in range(count)]


class DataPlaneProcess:
    """The real data plane (``python -m csi.fuse``) in a subprocess."""

    def __init__(self, work: Path, store: Path, repositories: dict[str, str]) -> None:
        self.work = work
        self.mountpoint = work / "mnt"
        self.socket = work / "dataplane.sock"
        self.store = store
        self.repositories = repositories
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DataPlaneProcess:
        # A killed data plane leaves its mount behind, dead (stat: ENOTCONN): the new one
        # clears it itself.
        try:
            self.mountpoint.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if e.errno != errno.ENOTCONN:
                raise
        cfg = self.work / "dataplane.json"
        cfg.write_text(
            json.dumps(
                {
                    "mountpoint": str(self.mountpoint),
                    "control_socket": str(self.socket),
                    "store": str(self.store),
                    "repositories": self.repositories,
                    "default_repository": next(iter(self.repositories), None),
                }
            )
        )
        log = open(self.work / "dataplane.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "csi.fuse", str(cfg)],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        client = DataPlaneClient(self.socket)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                return self
            except DataPlaneUnavailable:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "data plane did not start:\n" + (self.work / "dataplane.log").read_text()
                    ) from None
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: the FUSE mount stays behind, dead (ENOTCONN)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        with contextlib.suppress(OSError):
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True, check=False)


def driver_config(
    work: Path, repositories: dict[str, str], *, rpc_wait: float = 60, extra: Any = None
) -> tuple[DriverConfig, Path]:
    raw: dict[str, Any] = {
        "repositories": [
            {"name": name, "urls": [url], "allow_plain_http": True}
            for name, url in repositories.items()
        ],
        "store": {"path": str(work / "store")},
        "fetch": {"rpc_wait": rpc_wait, "concurrency": 8},
        "dataplane": {"mountpoint": str(work / "mnt"), "socket": str(work / "dataplane.sock")},
        "metrics": {"address": ""},
        # Targets and staging paths of these tests lie under the work directory; mounts are
        # repaired when a test says so (test_server_monitor.py runs the monitor itself).
        "node": {"kubelet_dir": str(work), "repair_interval": 0},
    }
    if extra:
        raw.update(extra)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "config.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    return config_from_dict(raw), path


class Stubs:
    def __init__(self, socket: Path) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.identity = rpc.IdentityStub(self.channel)
        self.node = rpc.NodeStub(self.channel)
        self.controller = rpc.ControllerStub(self.channel)

    def close(self) -> None:
        self.channel.close()


def code_of(fn: Any, request: Any) -> grpc.StatusCode:
    try:
        fn(request, timeout=120)
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def publish_request(
    volume_id: str, target: Path, context: dict[str, str], staging: str = ""
) -> pb.NodePublishVolumeRequest:
    return pb.NodePublishVolumeRequest(
        volume_id=volume_id,
        target_path=str(target),
        staging_target_path=staging,
        volume_capability=MOUNT_CAP,
        readonly=False,
        volume_context=context,
    )


def mounts_under(prefix: Path) -> list[str]:
    from csi.server.mounts import mounts_under as mu

    return mu(prefix)


@contextlib.contextmanager
def node_process(config_path: Path, endpoint: str, node_id: str, work: Path) -> Iterator[Any]:
    """The node plugin as a subprocess (for kill -9 tests)."""
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO);"
        "from csi.server import serve_node;"
        "serve_node(sys.argv[1], sys.argv[2], sys.argv[3])"
    )
    log = open(work / "node.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(config_path), endpoint, node_id],
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class NodeHarness:
    """A node plugin (in-process) with the real data plane, over a local or HTTP repository."""

    def __init__(
        self,
        work: Path,
        repo: str,
        fetcher: Any = None,
        rpc_wait: float = 60,
        max_workers: int = 64,
    ) -> None:
        self.work = work
        self.repo = repo
        self.config, self.config_path = driver_config(work, {"local": repo}, rpc_wait=rpc_wait)
        (work / "store").mkdir()
        self.dataplane = DataPlaneProcess(work, work / "store", {"local": repo}).start()
        self.fetcher = fetcher
        self.max_workers = max_workers
        self.socket = work / "csi" / "csi.sock"
        self.plugin = self._build()
        self.stubs = Stubs(self.socket)
        self.pods = work / "pods"
        self.pods.mkdir()

    def _build(self) -> Any:
        return build_node(
            self.config,
            f"unix://{self.socket}",
            "node-1",
            dataplane=FuseDataPlane(self.dataplane.socket),
            fetcher=self.fetcher,
            max_workers=self.max_workers,
        )

    def restart(self) -> None:
        self.stubs.close()
        self.plugin.stop()
        self.plugin = self._build()
        self.stubs = Stubs(self.socket)

    def target(self, name: str) -> Path:
        d = self.pods / name / "volumes"
        d.mkdir(parents=True, exist_ok=True)
        return d / "mount"

    def close(self) -> None:
        self.stubs.close()
        self.plugin.stop()
        self.dataplane.stop()
