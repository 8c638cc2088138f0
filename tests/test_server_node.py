"""Kubelet-like tests of the node plugin over its real Unix socket with a real gRPC client, the
real FUSE data plane (a subprocess) and images in a local repository."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi.fetch.progress import FetchProgress
from csi.server.fetcher import RepositoryFetcher
from csi.server.imageinfo import measure
from csi.server.mounts import mounts_at, unmount
from csi.server.proto import csi_pb2 as pb
from tests._serverkit import (
    MOUNT_CAP,
    POD_INFO,
    RepoImage,
    Stubs,
    code_of,
    driver_config,
    fuse_repo,
    mounts_under,
    publish_request,
)
from tests._serverkit import (
    NodeHarness as Node,
)
from tests.support.snapshot import diff_snapshots, snapshot

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[RepoImage]]:
    return fuse_repo(tmp_path_factory, 3)


@pytest.fixture
def node(tmp_path: Path, images: tuple[Path, list[RepoImage]]) -> Iterator[Node]:
    n = Node(tmp_path, str(images[0]))
    try:
        yield n
    finally:
        n.close()
        leaked = mounts_under(tmp_path / "pods")
        for m in leaked:
            unmount(m, lazy=True)
    assert leaked == []


def assert_same_tree(mounted: Path, source: Path) -> None:
    diff = diff_snapshots(snapshot(source), snapshot(mounted))
    assert diff == [], "\n".join(diff[:20])


def our_leases(node: Node) -> dict[str, set[bytes]]:
    return {h: i for h, i in node.plugin.store.leases().items() if h.startswith("csi-volume:")}


def test_identity(node: Node, images: tuple[Path, list[RepoImage]]) -> None:
    info = node.stubs.identity.GetPluginInfo(pb.GetPluginInfoRequest())
    assert info.name == "csi.composefs.io"
    assert info.vendor_version
    caps = node.stubs.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest())
    # The plugin's capabilities, whichever process answers: a controller serves this driver
    # (controller.enabled, true by default), even if not on this socket.
    service = pb.PluginCapability.Service
    assert [c.service.type for c in caps.capabilities] == [service.CONTROLLER_SERVICE]
    probe = node.stubs.identity.Probe(pb.ProbeRequest())
    assert probe.ready.value is True
    node.dataplane.stop()
    with pytest.raises(grpc.RpcError) as e:
        node.stubs.identity.Probe(pb.ProbeRequest())
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "data plane" in (e.value.details() or "")


def test_info_and_capabilities(node: Node) -> None:
    info = node.stubs.node.NodeGetInfo(pb.NodeGetInfoRequest())
    assert info.node_id == "node-1"
    caps = node.stubs.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest())
    types = {c.rpc.type for c in caps.capabilities}
    rpc = pb.NodeServiceCapability.RPC
    assert types == {rpc.STAGE_UNSTAGE_VOLUME, rpc.GET_VOLUME_STATS, rpc.VOLUME_CONDITION}


def test_ephemeral_publish_unpublish(node: Node, images: tuple[Path, list[RepoImage]]) -> None:
    img = images[1][0]
    target = node.target("pod-a")
    context = {**POD_INFO, "image": img.name, "repository": "local"}
    req = publish_request("csi-3f2a9c", target, context)
    for _ in range(2):  # idempotent
        node.stubs.node.NodePublishVolume(req)
    assert_same_tree(target, img.source)
    (mnt,) = mounts_at(target)
    assert {"ro", "nosuid", "nodev"} <= mnt.options
    with pytest.raises(OSError) as e:
        (target / "new-file").write_text("x")
    assert e.value.errno == errno.EROFS
    assert our_leases(node) == {"csi-volume:csi-3f2a9c": {img.digest}}

    stats = node.stubs.node.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id="csi-3f2a9c", volume_path=str(target))
    )
    want = measure(node.plugin.store.image_path(img.digest))
    usage = {u.unit: u for u in stats.usage}
    assert usage[pb.VolumeUsage.BYTES].used == want.bytes
    source_bytes = sum(
        st.st_size
        for p in img.source.rglob("*")
        if (st := p.lstat()) and p.is_file() and not p.is_symlink()
    )
    # hard links count once in the image; the sum over names counts them again
    assert 0 < usage[pb.VolumeUsage.BYTES].used <= source_bytes
    assert usage[pb.VolumeUsage.INODES].used == want.inodes
    assert stats.volume_condition.abnormal is False

    unpub = pb.NodeUnpublishVolumeRequest(volume_id="csi-3f2a9c", target_path=str(target))
    for _ in range(2):
        node.stubs.node.NodeUnpublishVolume(unpub)
    assert not target.exists()
    assert mounts_under(node.pods) == []
    assert our_leases(node) == {}
    assert node.plugin.manager.dataplane.holders() == {}


def test_digest_ref_layers_and_lazy(node: Node, images: tuple[Path, list[RepoImage]]) -> None:
    a, b, c = images[1]
    # lazy: objects are fetched by the data plane on first read
    t1 = node.target("lazy")
    ctx = {**POD_INFO, "image": c.ref, "fetch": "lazy"}
    node.stubs.node.NodePublishVolume(publish_request("v-lazy", t1, ctx))
    assert node.plugin.store.missing_objects(c.digest)  # not fetched by the publish
    assert_same_tree(t1, c.source)
    # layers: two images composed, the upper one's files win
    t2 = node.target("layers")
    ctx = {**POD_INFO, "layers": f"{a.name},{b.ref}"}
    node.stubs.node.NodePublishVolume(publish_request("v-layers", t2, ctx))
    upper = snapshot(b.source)
    merged = snapshot(t2)
    for path, entry in upper.items():
        if path != "/" and entry.type != "dir":
            assert merged[path].sha256 == entry.sha256, path
    for vid, t in (("v-lazy", t1), ("v-layers", t2)):
        node.stubs.node.NodeUnpublishVolume(
            pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(t))
        )
    assert our_leases(node) == {}


def test_missing_fields_and_errors(node: Node, images: tuple[Path, list[RepoImage]]) -> None:
    img = images[1][0]
    n = node.stubs.node
    t = node.target("errs")
    s = str(node.work / "s")  # a staging path under kubelet's directory (node.work here)
    ctx = {**POD_INFO, "image": img.name}
    cases: list[tuple[Any, Any, grpc.StatusCode]] = [
        (n.NodePublishVolume, publish_request("", t, ctx), INVALID),
        (n.NodePublishVolume, publish_request("v", Path(""), ctx), INVALID),
        (
            n.NodePublishVolume,
            pb.NodePublishVolumeRequest(volume_id="v", target_path=str(t), volume_context=ctx),
            INVALID,
        ),
        (
            n.NodePublishVolume,
            pb.NodePublishVolumeRequest(
                volume_id="v",
                target_path=str(t),
                volume_context=ctx,
                volume_capability=pb.VolumeCapability(
                    block=pb.VolumeCapability.BlockVolume(),
                    access_mode=MOUNT_CAP.access_mode,
                ),
            ),
            INVALID,
        ),
        (n.NodePublishVolume, publish_request("v", t, {**POD_INFO}), INVALID),
        (n.NodePublishVolume, publish_request("v", t, {**ctx, "imgae": "x"}), INVALID),
        (n.NodePublishVolume, publish_request("v", t, {**ctx, "repository": "nope"}), INVALID),
        (n.NodePublishVolume, publish_request("v", t, {**ctx, "fetch": "sometimes"}), INVALID),
        (n.NodePublishVolume, publish_request("v", t, {**ctx, "image": "../x"}), INVALID),
        (
            n.NodePublishVolume,
            publish_request("v", t, {**ctx, "image": "no-such-ref"}),
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            n.NodePublishVolume,
            publish_request("v", t, {**ctx, "image": "sha256:" + "ab" * 32}),
            grpc.StatusCode.NOT_FOUND,
        ),
        # persistent volume without NodeStageVolume first
        (
            n.NodePublishVolume,
            publish_request("static-pv", t, {"image": img.name}, staging=str(node.work / "st")),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        (n.NodeUnpublishVolume, pb.NodeUnpublishVolumeRequest(target_path=str(t)), INVALID),
        (n.NodeUnpublishVolume, pb.NodeUnpublishVolumeRequest(volume_id="v"), INVALID),
        (
            n.NodeUnpublishVolume,
            pb.NodeUnpublishVolumeRequest(volume_id="never", target_path=str(t)),
            OK,
        ),
        (
            n.NodeStageVolume,
            pb.NodeStageVolumeRequest(staging_target_path=s, volume_capability=MOUNT_CAP),
            INVALID,
        ),
        (
            n.NodeStageVolume,
            pb.NodeStageVolumeRequest(volume_id="v", volume_capability=MOUNT_CAP),
            INVALID,
        ),
        (
            n.NodeStageVolume,
            pb.NodeStageVolumeRequest(volume_id="v", staging_target_path=s),
            INVALID,
        ),
        (
            n.NodeStageVolume,
            pb.NodeStageVolumeRequest(
                volume_id="cfs1:aaaaaaaa:e:local:bad",
                staging_target_path=s,
                volume_capability=MOUNT_CAP,
            ),
            grpc.StatusCode.NOT_FOUND,
        ),
        (n.NodeUnstageVolume, pb.NodeUnstageVolumeRequest(staging_target_path=s), INVALID),
        (n.NodeUnstageVolume, pb.NodeUnstageVolumeRequest(volume_id="v"), INVALID),
        (
            n.NodeUnstageVolume,
            pb.NodeUnstageVolumeRequest(volume_id="v", staging_target_path=s),
            OK,
        ),
        # paths outside kubelet's directory: refused (stats: NOT_FOUND, the spec's code)
        (n.NodePublishVolume, publish_request("v", Path("/etc"), ctx), INVALID),
        (
            n.NodeUnpublishVolume,
            pb.NodeUnpublishVolumeRequest(volume_id="v", target_path=str(node.work.parent)),
            INVALID,
        ),
        (
            n.NodeStageVolume,
            pb.NodeStageVolumeRequest(
                volume_id="v", staging_target_path="/s", volume_capability=MOUNT_CAP
            ),
            INVALID,
        ),
        (
            n.NodeGetVolumeStats,
            pb.NodeGetVolumeStatsRequest(volume_id="v", volume_path="/etc"),
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            n.NodeGetVolumeStats,
            pb.NodeGetVolumeStatsRequest(volume_id="v", volume_path="relative/path"),
            grpc.StatusCode.NOT_FOUND,
        ),
        (n.NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(volume_path=str(t)), INVALID),
        (n.NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(volume_id="v"), INVALID),
        (
            n.NodeGetVolumeStats,
            pb.NodeGetVolumeStatsRequest(volume_id="v", volume_path=str(t)),
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            n.NodeExpandVolume,
            pb.NodeExpandVolumeRequest(volume_id="v"),
            grpc.StatusCode.UNIMPLEMENTED,
        ),
    ]
    for fn, req, want in cases:
        for _ in range(2):  # the same answer every time
            assert code_of(fn, req) == want, (fn, req)
    assert not t.exists()
    assert mounts_under(node.pods) == []
    assert our_leases(node) == {}
    # another volume on a published target
    node.stubs.node.NodePublishVolume(publish_request("v1", t, ctx))
    assert (
        code_of(n.NodePublishVolume, publish_request("v2", t, ctx))
        == grpc.StatusCode.ALREADY_EXISTS
    )
    assert (
        code_of(
            n.NodeUnpublishVolume, pb.NodeUnpublishVolumeRequest(volume_id="v2", target_path=str(t))
        )
        == grpc.StatusCode.NOT_FOUND
    )
    node.stubs.node.NodeUnpublishVolume(
        pb.NodeUnpublishVolumeRequest(volume_id="v1", target_path=str(t))
    )


class GatedFetcher(RepositoryFetcher):
    """Counts fetches and holds each one until ``gate`` is set."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.gate = threading.Event()
        self.calls: list[bytes] = []

    def fetch(self, repository: str, image: bytes, *, lazy: bool, progress: FetchProgress) -> None:
        self.calls.append(image)
        assert self.gate.wait(60)
        super().fetch(repository, image, lazy=lazy, progress=progress)


def test_slow_fetch_continues_in_background(
    tmp_path: Path, images: tuple[Path, list[RepoImage]]
) -> None:
    from csi.config import config_from_dict
    from csi.store import Store

    repo, imgs = images
    img = imgs[2]
    holder: dict[str, Any] = {}

    class LateFetcher:
        """Built once the store exists (the plugin opens it)."""

        def resolve(self, repository: str, ref: str) -> bytes:
            return holder["f"].resolve(repository, ref)  # type: ignore[no-any-return]

        def fetch(
            self, repository: str, image: bytes, *, lazy: bool, progress: FetchProgress
        ) -> None:
            holder["f"].fetch(repository, image, lazy=lazy, progress=progress)

    node = Node(tmp_path, str(repo), fetcher=LateFetcher(), rpc_wait=1)
    try:
        gated = GatedFetcher(node.config.repositories, node.plugin.store)
        holder["f"] = gated
        t = node.target("slow")
        req = publish_request("v-slow", t, {**POD_INFO, "image": img.ref})
        for _ in range(3):  # kubelet retries: each joins the running fetch
            with pytest.raises(grpc.RpcError) as e:
                node.stubs.node.NodePublishVolume(req)
            assert e.value.code() == grpc.StatusCode.ABORTED
            assert "in progress" in (e.value.details() or "")
            assert not t.exists()
        assert gated.calls == [img.digest]
        gated.gate.set()
        for _ in range(100):
            if code_of(node.stubs.node.NodePublishVolume, req) == OK:
                break
        assert gated.calls == [img.digest]  # never started over
        assert_same_tree(t, img.source)
        node.stubs.node.NodeUnpublishVolume(
            pb.NodeUnpublishVolumeRequest(volume_id="v-slow", target_path=str(t))
        )
    finally:
        node.close()
    del config_from_dict, Store


def test_dead_data_plane_is_repaired(node: Node, images: tuple[Path, list[RepoImage]]) -> None:
    img = images[1][0]
    t = node.target("repair")
    node.stubs.node.NodePublishVolume(publish_request("v-r", t, {**POD_INFO, "image": img.ref}))
    node.dataplane.kill()
    with pytest.raises(OSError) as e:
        os.listdir(t)
    assert e.value.errno == errno.ENOTCONN
    stats = node.stubs.node.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id="v-r", volume_path=str(t))
    )
    assert stats.volume_condition.abnormal is True
    assert "broken" in stats.volume_condition.message
    node.dataplane.start()
    node.restart()  # reconciliation re-adds the view and mounts it again
    assert node.plugin.reconcile_report.repaired == [str(t)]
    assert_same_tree(t, img.source)
    # a publish retried by kubelet also repairs (without a restart)
    node.dataplane.kill()
    node.dataplane.start()
    node.stubs.node.NodePublishVolume(publish_request("v-r", t, {**POD_INFO, "image": img.ref}))
    assert_same_tree(t, img.source)
    node.stubs.node.NodeUnpublishVolume(
        pb.NodeUnpublishVolumeRequest(volume_id="v-r", target_path=str(t))
    )
    assert not t.exists()


def test_persistent_flow(node: Node, images: tuple[Path, list[RepoImage]]) -> None:
    """CreateVolume -> NodeStage -> NodePublish (two pods) -> NodeUnpublish -> NodeUnstage ->
    DeleteVolume, each call twice."""
    from csi.server import build_controller

    img = images[1][1]
    cwork = node.work / "controller"
    cwork.mkdir()
    cconfig, _ = driver_config(cwork, {"local": node.repo})
    ctrl = build_controller(cconfig, f"unix://{cwork}/csi.sock")
    cstubs = Stubs(cwork / "csi.sock")
    try:
        create = pb.CreateVolumeRequest(
            name="pvc-7d1e",
            parameters={"image": img.name, "fetch": "eager"},
            volume_capabilities=[MOUNT_CAP],
        )
        vol = cstubs.controller.CreateVolume(create).volume
        assert cstubs.controller.CreateVolume(create).volume == vol
        staging = node.work / "staging" / "globalmount"
        staging.mkdir(parents=True)
        stage = pb.NodeStageVolumeRequest(
            volume_id=vol.volume_id,
            staging_target_path=str(staging),
            volume_capability=MOUNT_CAP,
            volume_context=vol.volume_context,
        )
        for _ in range(2):
            node.stubs.node.NodeStageVolume(stage)
        assert our_leases(node) == {f"csi-volume:{vol.volume_id}": {img.digest}}
        assert not node.plugin.store.missing_objects(img.digest)
        other = pb.NodeStageVolumeRequest()
        other.CopyFrom(stage)
        other.staging_target_path = str(node.work / "elsewhere")
        assert code_of(node.stubs.node.NodeStageVolume, other) == (
            grpc.StatusCode.FAILED_PRECONDITION
        )
        targets = [node.target("pv-a"), node.target("pv-b")]
        pod_ctx = {k: v for k, v in POD_INFO.items() if not k.endswith("ephemeral")}
        for t in targets:
            req = publish_request(
                vol.volume_id, t, {**vol.volume_context, **pod_ctx}, staging=str(staging)
            )
            for _ in range(2):
                node.stubs.node.NodePublishVolume(req)
            assert_same_tree(t, img.source)
        stats = node.stubs.node.NodeGetVolumeStats(
            pb.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=str(staging))
        )
        assert stats.usage[0].used == vol.capacity_bytes
        unstage = pb.NodeUnstageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(staging)
        )
        # still published: refused
        assert code_of(node.stubs.node.NodeUnstageVolume, unstage) == (
            grpc.StatusCode.FAILED_PRECONDITION
        )
        for t in targets:
            for _ in range(2):
                node.stubs.node.NodeUnpublishVolume(
                    pb.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=str(t))
                )
            assert not t.exists()
        for _ in range(2):
            node.stubs.node.NodeUnstageVolume(unstage)
        assert our_leases(node) == {}
        for _ in range(2):
            cstubs.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    finally:
        cstubs.close()
        ctrl.stop()


def test_metrics(node: Node, images: tuple[Path, list[RepoImage]]) -> None:
    import urllib.request

    from csi.server.metrics import serve_metrics

    img = images[1][2]
    t = node.target("metrics")
    node.stubs.node.NodePublishVolume(publish_request("v-m", t, {**POD_INFO, "image": img.ref}))
    host, port = serve_metrics("127.0.0.1:0") or ("", 0)
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
    assert 'composefs_csi_grpc_requests_total{code="OK",method="NodePublishVolume"}' in text
    assert (
        'composefs_csi_grpc_request_duration_seconds_bucket{le="0.05",method="NodePublishVolume"}'
        in text
    )
    assert "composefs_csi_volumes_published 1.0" in text
    assert "composefs_csi_publish_duration_seconds_count{cache=" in text
    assert "composefs_csi_store_bytes" in text  # the store's metrics are in the same registry
    node.stubs.node.NodeUnpublishVolume(
        pb.NodeUnpublishVolumeRequest(volume_id="v-m", target_path=str(t))
    )
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
    assert "composefs_csi_volumes_published 0.0" in text
