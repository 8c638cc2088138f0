"""The node plugin touches only its own mounts (issue 11): symlinked targets, someone else's
mounts and directories, the driver's own directories, and paths it must refuse, against the
real node plugin, the real FUSE data plane and real mounts. kubelet's part is played by the
test (it calls the plugin's socket as kubelet would)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi.server.mounts import mounts_at, parse_mountinfo, unmount
from csi.server.proto import csi_pb2 as pb
from tests._serverkit import (
    POD_INFO,
    RepoImage,
    code_of,
    fuse_repo,
    mounts_under,
    publish_request,
)
from tests._serverkit import NodeHarness as Node

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[RepoImage]]:
    return fuse_repo(tmp_path_factory, 1, n=20)


@pytest.fixture
def node(tmp_path: Path, images: tuple[Path, list[RepoImage]]) -> Iterator[Node]:
    n = Node(tmp_path / "node", str(images[0]))
    try:
        yield n
    finally:
        n.close()
        for m in reversed(mounts_under(tmp_path)):
            unmount(m, lazy=True)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory outside kubelet's, standing in for /etc."""
    d = tmp_path / "etc"
    d.mkdir()
    (d / "passwd").write_text("root:x:0:0\n")
    return d


def _ctx(images: tuple[Path, list[RepoImage]]) -> dict[str, str]:
    return {**POD_INFO, "image": images[1][0].name}


def _publish(node: Node, vid: str, target: Path, ctx: dict[str, str]) -> grpc.StatusCode:
    return code_of(node.stubs.node.NodePublishVolume, publish_request(vid, target, ctx))


def _unpublish(node: Node, vid: str, target: Path | str) -> grpc.StatusCode:
    req = pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target))
    return code_of(node.stubs.node.NodeUnpublishVolume, req)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A directory under kubelet's with a tmpfs (someone else's mount) on it."""
    d = tmp_path / "node" / "pods" / "other" / "volumes" / "mount"
    d.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "theirs", str(d)], check=True)
    (d / "their-file").write_text("keep me")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_a_symlinked_target_is_refused(
    node: Node, images: tuple[Path, list[RepoImage]], outside: Path
) -> None:
    target = node.target("evil")
    target.symlink_to(outside)  # the target itself is a link to "/etc"
    assert _publish(node, "v1", target, _ctx(images)) == PRECONDITION
    assert mounts_at(outside) == [] and mounts_at(target) == []
    assert (outside / "passwd").read_text() == "root:x:0:0\n"
    assert target.is_symlink()
    # A link higher up: pods/evil2 -> "/etc", target pods/evil2/mount.
    (node.pods / "evil2").symlink_to(outside)
    t2 = node.pods / "evil2" / "mount"
    assert _publish(node, "v2", t2, _ctx(images)) == PRECONDITION
    assert sorted(os.listdir(outside)) == ["passwd"]  # nothing was created there
    assert mounts_under(outside) == []
    assert _unpublish(node, "v1", target) == grpc.StatusCode.OK
    assert target.is_symlink() and mounts_at(outside) == []


def test_someone_elses_mount_is_left_alone(
    node: Node, images: tuple[Path, list[RepoImage]], tmpfs: Path
) -> None:
    assert _publish(node, "v1", tmpfs, _ctx(images)) == PRECONDITION
    assert [m.fstype for m in mounts_at(tmpfs)] == ["tmpfs"]
    assert (tmpfs / "their-file").read_text() == "keep me"
    # Unpublishing a target this plugin has no record of: OK, and nothing of theirs goes.
    assert _unpublish(node, "v1", tmpfs) == grpc.StatusCode.OK
    assert [m.fstype for m in mounts_at(tmpfs)] == ["tmpfs"]
    assert (tmpfs / "their-file").read_text() == "keep me"


def test_foreign_directories_stay(node: Node, images: tuple[Path, list[RepoImage]]) -> None:
    # An empty directory the plugin did not make, unpublished without a record: it stays.
    theirs = node.target("theirs")
    theirs.mkdir()
    assert _unpublish(node, "v1", theirs) == grpc.StatusCode.OK
    assert theirs.is_dir()
    # A target that already existed when published is left in place by the unpublish...
    assert _publish(node, "v1", theirs, _ctx(images)) == grpc.StatusCode.OK
    assert mounts_at(theirs)
    assert _unpublish(node, "v1", theirs) == grpc.StatusCode.OK
    assert theirs.is_dir() and not mounts_at(theirs)
    # ...while one the plugin made goes with it.
    mine = node.target("mine")
    assert _publish(node, "v2", mine, _ctx(images)) == grpc.StatusCode.OK
    assert _unpublish(node, "v2", mine) == grpc.StatusCode.OK
    assert not mine.exists()


def test_the_drivers_own_directories_are_refused(node: Node) -> None:
    mnt = node.dataplane.mountpoint
    assert mounts_at(mnt), "the data plane is mounted"
    # The data plane's mountpoint and the store lie under this test's kubelet directory, so
    # only the explicit check keeps them safe.
    assert _unpublish(node, "v1", mnt) == INVALID
    assert _unpublish(node, "v1", node.work / "store") == INVALID
    assert _unpublish(node, "v1", "/etc") == INVALID
    assert mounts_at(mnt), "the data plane is still mounted"
    node.stubs.identity.Probe(pb.ProbeRequest())  # and answers


def test_bad_targets_get_clear_codes(node: Node, images: tuple[Path, list[RepoImage]]) -> None:
    ctx = _ctx(images)
    a_file = node.target("file")
    a_file.write_text("not a directory")
    req = publish_request("v1", a_file, ctx)
    with pytest.raises(grpc.RpcError) as e:
        node.stubs.node.NodePublishVolume(req)
    assert e.value.code() == PRECONDITION and "not a directory" in (e.value.details() or "")
    too_long = node.pods / ("x" * 300) / "mount"
    assert _publish(node, "v1", too_long, ctx) == INVALID
    deep = node.pods / "/".join(["d" * 200] * 25) / "mount"
    assert _publish(node, "v1", deep, ctx) == INVALID
    # A target inside another published (read-only) volume.
    outer = node.target("outer")
    assert _publish(node, "v2", outer, ctx) == grpc.StatusCode.OK
    inner = outer / "inner"
    with pytest.raises(grpc.RpcError) as e:
        node.stubs.node.NodePublishVolume(publish_request("v3", inner, ctx))
    assert e.value.code() == PRECONDITION and "read-only" in (e.value.details() or "")
    assert _unpublish(node, "v2", outer) == grpc.StatusCode.OK
    # Stats of a path that does not exist under kubelet's directory: NOT_FOUND.
    stats = pb.NodeGetVolumeStatsRequest(volume_id="v2", volume_path=str(node.target("gone")))
    assert code_of(node.stubs.node.NodeGetVolumeStats, stats) == grpc.StatusCode.NOT_FOUND


def test_only_mounts_with_our_source_are_ours() -> None:
    from csi.server.mounts import is_ours

    table = parse_mountinfo(
        "100 36 0:52 /0d05 /k/a ro shared:5 - fuse.composefs-csi composefs-csi:0123456789ab ro\n"
        "101 36 0:53 /0d05 /k/b ro shared:6 - fuse.composefs-csi composefs-csi:ffffffffffff ro\n"
        "102 36 0:54 / /k/c rw - tmpfs composefs-csi:0123456789ab rw\n"
    )
    assert [is_ours(m, "composefs-csi:0123456789ab") for m in table] == [True, False, False]


def test_the_monitor_leaves_a_mount_over_a_target_alone(
    node: Node, images: tuple[Path, list[RepoImage]]
) -> None:
    """Someone else mounted over a published target: the mount monitor neither repairs it
    (which would mean mounting over their mount) nor counts it as broken."""
    target = node.target("covered")
    assert _publish(node, "v1", target, _ctx(images)) == grpc.StatusCode.OK
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "theirs", str(target)], check=True)
    try:
        monitor = node.plugin.monitor
        for _ in range(3):
            assert monitor.run_once() == []
        assert monitor.check() is None
        assert mounts_at(target)[-1].fstype == "tmpfs"
    finally:
        subprocess.run(["umount", str(target)], check=True)
    assert _unpublish(node, "v1", target) == grpc.StatusCode.OK
