"""Repository down (issue 14): a node whose store holds an image publishes it by ref and by
digest while every mirror is unreachable; a ref it never resolved fails with UNAVAILABLE.

Kubelet is played by a real gRPC client over the plugin's Unix socket; the node plugin, the
FUSE data plane, nginx and the latency proxy in front of it (stopped for the outage) are real.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from csi.server.mounts import unmount
from csi.server.proto import csi_pb2 as pb
from tests._serverkit import (
    POD_INFO,
    NodeHarness,
    code_of,
    fuse_problem,
    make_repo,
    mounts_under,
    publish_request,
)
from tests.nginx import Nginx, static_server
from tests.support.latency import LatencyProxy

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]


def same_tree(mounted: Path, source: Path) -> bool:
    def listing(root: Path) -> list[tuple[str, bool]]:
        return sorted((str(p.relative_to(root)), p.is_dir()) for p in root.rglob("*"))

    return listing(mounted) == listing(source)


def test_repository_down_local_images_publish_by_ref_and_digest(tmp_path: Path) -> None:
    problem = fuse_problem()
    if problem:
        pytest.skip(problem)
    img, never = make_repo(tmp_path / "r", 2)
    with Nginx(tmp_path / "ng", [static_server(tmp_path / "r" / "repo")]) as ng:
        proxy = LatencyProxy(ng.port, 0.01).start()
        node = NodeHarness(tmp_path / "node", proxy.url())
        try:
            publish = node.stubs.node.NodePublishVolume
            ctx = {**POD_INFO, "repository": "local"}
            # Up: a cold publish by ref fetches the image and records the ref.
            node.stubs.node.NodePublishVolume(
                publish_request("csi-up", node.target("up"), {**ctx, "image": img.name})
            )
            assert same_tree(node.target("up"), img.source)

            proxy.stop()  # every mirror unreachable from here on
            by_ref = publish_request("csi-ref", node.target("ref"), {**ctx, "image": img.name})
            by_digest = publish_request(
                "csi-digest", node.target("digest"), {**ctx, "image": img.ref}
            )
            publish(by_ref)
            publish(by_digest)
            assert same_tree(node.target("ref"), img.source)
            assert same_tree(node.target("digest"), img.source)
            # A ref this node never resolved cannot be served from memory.
            unknown = publish_request("csi-new", node.target("new"), {**ctx, "image": never.name})
            assert code_of(publish, unknown) == grpc.StatusCode.UNAVAILABLE
            for vid, name in (("csi-up", "up"), ("csi-ref", "ref"), ("csi-digest", "digest")):
                node.stubs.node.NodeUnpublishVolume(
                    pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(node.target(name)))
                )
            assert mounts_under(node.pods) == []
        finally:
            node.close()
            proxy.stop()
            for m in mounts_under(tmp_path / "node" / "pods"):
                unmount(m, lazy=True)
