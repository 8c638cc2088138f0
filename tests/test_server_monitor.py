"""The node plugin's mount monitor (issue 12): after the data plane is killed with SIGKILL and
started again, every published target is repaired within a few seconds with no kubelet call,
and a pod that sees its volume with HostToContainer propagation reads again.

Real parts: the FUSE data plane (a subprocess killed for real), the node plugin, real mounts.
The "pod" is a process in a mount namespace of its own that binds the target the way the
container runtime does for a pod volume: with rslave (HostToContainer) propagation, or private
(None). The kubelet directory is an rshared bind mount, as on a node where mount propagation
works.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.server.mounts import mounts_at, mounts_under, probe, unmount
from tests._serverkit import POD_INFO, RepoImage, fuse_repo, publish_request
from tests._serverkit import NodeHarness as Node

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[RepoImage]]:
    return fuse_repo(tmp_path_factory, 1, n=20)


@pytest.fixture
def node(tmp_path: Path, images: tuple[Path, list[RepoImage]]) -> Iterator[Node]:
    work = tmp_path / "node"
    work.mkdir()
    # Mount propagation needs a shared mount: the work directory stands in for the node's /.
    subprocess.run(["mount", "--bind", str(work), str(work)], check=True)
    subprocess.run(["mount", "--make-rshared", str(work)], check=True)
    n = Node(work, str(images[0]))
    try:
        yield n
    finally:
        n.close()
        for m in reversed(mounts_under(work)):
            unmount(m, lazy=True)


@contextlib.contextmanager
def pod(target: Path, mountpoint: Path, propagation: str) -> Iterator[subprocess.Popen[str]]:
    """A process in its own mount namespace that has ``target`` bound at ``mountpoint`` and
    asks it five times a second for a statfs and a listing (statfs always reaches the data
    plane; a listing may be answered from the kernel's caches), printing ok or fail."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    script = (
        f"mount --bind {target} {mountpoint} && mount --make-{propagation} {mountpoint}"
        f" && echo ready && while true; do"
        f" if stat -f {mountpoint} >/dev/null 2>&1 && ls {mountpoint}/ >/dev/null 2>&1;"
        " then echo ok; else echo fail; fi; sleep 0.2; done"
    )
    proc = subprocess.Popen(
        # Like a container: every mount of its namespace a slave of the host's (its own mounts
        # do not propagate back), the volume bound with the pod's propagation.
        ["unshare", "--mount", "--propagation", "slave", "sh", "-c", script],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def last_lines(proc: subprocess.Popen[str], seconds: float) -> list[str]:
    assert proc.stdout is not None
    out: list[str] = []
    end = time.monotonic() + seconds
    poller = select.poll()  # not select(): the descriptor may be past 1024 in a long run
    poller.register(proc.stdout, select.POLLIN)
    while time.monotonic() < end:
        if poller.poll(100):
            out.append(proc.stdout.readline().strip())
    return out


def test_a_killed_data_plane_is_repaired_without_kubelet(
    node: Node, images: tuple[Path, list[RepoImage]]
) -> None:
    img = images[1][0]
    shared, private = node.target("h2c"), node.target("none")
    for vid, t in (("v-1", shared), ("v-2", private)):
        node.stubs.node.NodePublishVolume(publish_request(vid, t, {**POD_INFO, "image": img.ref}))
    monitor = node.plugin.monitor
    assert monitor.run_once() == [] and monitor.check() is None  # all healthy
    with (
        pod(shared, node.work / "pods-rootfs" / "a", "rslave") as pod_a,
        pod(private, node.work / "pods-rootfs" / "b", "private") as pod_b,
    ):
        assert last_lines(pod_a, 0.6)[-1] == "ok"
        node.dataplane.kill()
        assert probe(shared) != 0 and last_lines(pod_a, 0.6)[-1] == "fail"
        assert monitor.run_once() == []  # nothing to repair from while the data plane is down
        assert "not serving" in (monitor.check() or "")
        node.dataplane.start()
        repaired = monitor.run_once()  # what the monitor thread does every few seconds
        assert sorted(repaired) == sorted([str(shared), str(private)])
        assert monitor.check() is None
        for t in (shared, private):
            assert probe(t) == 0 and len(os.listdir(t)) > 0
            # The live view is on top; the dead one beneath it, covered, goes with unpublish.
            top = mounts_at(t)[-1]
            assert top.device == node.plugin.manager.dataplane_device()
        # The HostToContainer pod reads again, with no kubelet call and no restart.
        assert last_lines(pod_a, 1.0)[-1] == "ok"
        # The pod without propagation keeps what it had when it started (dead): documented.
        assert last_lines(pod_b, 0.6)[-1] == "fail"
        assert monitor.run_once() == []  # healthy now: nothing more to do
    for vid, t in (("v-1", shared), ("v-2", private)):
        from csi.server.proto import csi_pb2 as pb

        node.stubs.node.NodeUnpublishVolume(
            pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(t))
        )
        assert not t.exists() and mounts_at(t) == []  # the covered dead mount went too


def test_the_monitor_thread_repairs_on_its_own(
    tmp_path: Path, images: tuple[Path, list[RepoImage]]
) -> None:
    from csi.server.monitor import MountMonitor

    work = tmp_path / "node"
    n = Node(work, str(images[0]))
    try:
        img = images[1][0]
        t = n.target("auto")
        n.stubs.node.NodePublishVolume(publish_request("v-a", t, {**POD_INFO, "image": img.ref}))
        monitor = MountMonitor(n.plugin.manager, interval=0.2)
        monitor.start()
        try:
            n.dataplane.kill()
            n.dataplane.start()
            deadline = time.monotonic() + 10  # the bar: within 10 s
            while probe(t) != 0:
                assert time.monotonic() < deadline, "not repaired within 10 s"
                time.sleep(0.1)
        finally:
            monitor.stop()
        assert len(os.listdir(t)) > 0
    finally:
        n.close()
        for m in reversed(mounts_under(tmp_path)):
            unmount(m, lazy=True)
