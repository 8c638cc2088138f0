"""The whole persistent-volume lifecycle across the driver's two processes, as a conformance
suite drives it with a node endpoint and a controller endpoint: both report the plugin's
capabilities (CONTROLLER_SERVICE included), then CreateVolume (controller) -> NodeStageVolume ->
NodePublishVolume (node) -> read -> NodeUnpublishVolume -> NodeUnstageVolume -> DeleteVolume,
each step repeated for idempotency.

The node plugin, the controller and the FUSE data plane run as real processes (the CLI's
``node``, ``controller`` and ``dataplane``); the test plays the external-provisioner and
kubelet at their gRPC boundary.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi.server.mounts import mounts_at, unmount
from csi.server.proto import csi_pb2 as pb
from tests._serverkit import (
    MOUNT_CAP,
    REPO_ROOT,
    DataPlaneProcess,
    Stubs,
    driver_config,
    fuse_problem,
    make_repo,
    mounts_under,
)
from tests.support.snapshot import diff_snapshots, snapshot

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

READ_ONLY_MANY = pb.VolumeCapability(
    mount=pb.VolumeCapability.MountVolume(),
    access_mode=pb.VolumeCapability.AccessMode(
        mode=pb.VolumeCapability.AccessMode.MULTI_NODE_READER_ONLY
    ),
)


@contextlib.contextmanager
def driver_process(args: list[str], log: Path, socket: Path) -> Iterator[Stubs]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "csi.cli.main", *args],
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    stubs = Stubs(socket)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                stubs.identity.Probe(pb.ProbeRequest(), timeout=5)
                break
            except grpc.RpcError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{args[0]} did not start:\n{log.read_text()}") from None
                time.sleep(0.1)
        yield stubs
    finally:
        stubs.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_persistent_volume_lifecycle_across_node_and_controller(tmp_path: Path) -> None:
    problem = fuse_problem()
    if problem:
        pytest.skip(problem)
    (img,) = make_repo(tmp_path, 1, n=30)
    work = tmp_path / "node"
    _, config = driver_config(work, {"local": str(tmp_path / "repo")})
    (work / "store").mkdir()
    dp = DataPlaneProcess(work, work / "store", {"local": str(tmp_path / "repo")}).start()
    node_sock, ctrl_sock = work / "node.sock", work / "controller.sock"
    try:
        with (
            driver_process(
                [
                    *("node", "--config", str(config), "--endpoint", f"unix://{node_sock}"),
                    *("--node-id", "node-1"),
                ],
                work / "node.log",
                node_sock,
            ) as node,
            driver_process(
                ["controller", "--config", str(config), "--endpoint", f"unix://{ctrl_sock}"],
                work / "controller.log",
                ctrl_sock,
            ) as ctrl,
        ):
            service = pb.PluginCapability.Service
            for stubs in (node, ctrl):  # the plugin's capabilities, from either process
                caps = stubs.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest())
                assert service.CONTROLLER_SERVICE in [c.service.type for c in caps.capabilities]
                info = stubs.identity.GetPluginInfo(pb.GetPluginInfoRequest())
                assert info.name == "csi.composefs.io"

            create = pb.CreateVolumeRequest(
                name="pvc-0b3c5ad2",
                volume_capabilities=[READ_ONLY_MANY],
                parameters={"image": img.name},
            )
            vol = ctrl.controller.CreateVolume(create).volume
            assert ctrl.controller.CreateVolume(create).volume == vol  # idempotent
            staging = work / "plugins" / "kubernetes.io" / "csi" / "pv" / "staging"
            staging.mkdir(parents=True)
            stage = pb.NodeStageVolumeRequest(
                volume_id=vol.volume_id,
                staging_target_path=str(staging),
                volume_capability=MOUNT_CAP,
                volume_context=vol.volume_context,
            )
            for _ in range(2):
                node.node.NodeStageVolume(stage)
            target = work / "pods" / "uid-1" / "volumes" / "kubernetes.io~csi" / "pv" / "mount"
            target.parent.mkdir(parents=True)
            publish = pb.NodePublishVolumeRequest(
                volume_id=vol.volume_id,
                staging_target_path=str(staging),
                target_path=str(target),
                volume_capability=MOUNT_CAP,
                readonly=True,
                volume_context=vol.volume_context,
            )
            for _ in range(2):
                node.node.NodePublishVolume(publish)
            diff = diff_snapshots(snapshot(img.source), snapshot(target))
            assert diff == [], diff[:10]

            unpublish = pb.NodeUnpublishVolumeRequest(
                volume_id=vol.volume_id, target_path=str(target)
            )
            for _ in range(2):
                node.node.NodeUnpublishVolume(unpublish)
            assert not target.exists() and mounts_under(work / "pods") == []
            unstage = pb.NodeUnstageVolumeRequest(
                volume_id=vol.volume_id, staging_target_path=str(staging)
            )
            for _ in range(2):
                node.node.NodeUnstageVolume(unstage)
            delete = pb.DeleteVolumeRequest(volume_id=vol.volume_id)
            for _ in range(2):
                ctrl.controller.DeleteVolume(delete)
    finally:
        dp.stop()
        for m in reversed(mounts_under(tmp_path)):
            unmount(m, lazy=True)
    assert mounts_at(dp.mountpoint) == []
