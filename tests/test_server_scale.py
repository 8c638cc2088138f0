"""100 concurrent publishes of 10 images to 100 targets from a repository served by nginx:
all succeed, each object is downloaded once, and unpublishing them all leaves nothing behind."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from csi.image.tree import object_path
from csi.server.proto import csi_pb2 as pb
from tests._serverkit import (
    POD_INFO,
    NodeHarness,
    fuse_problem,
    make_repo,
    mounts_under,
    publish_request,
)
from tests.nginx import NGINX, Nginx, static_server
from tests.support.snapshot import diff_snapshots, snapshot

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(600)]


def test_100_concurrent_publishes(tmp_path: Path) -> None:
    problem = fuse_problem()
    if problem:
        pytest.skip(problem)
    if NGINX is None:
        pytest.skip("nginx is not installed (scripts/setup.sh installs it)")
    images = make_repo(tmp_path, 10, n=40, seed0=5000)
    repo = tmp_path / "repo"
    with Nginx(tmp_path / "nginx", [static_server(repo)], workers=2) as ng:
        node = NodeHarness(tmp_path / "node", f"http://127.0.0.1:{ng.port}/", max_workers=110)
        try:
            jobs = []
            for i in range(100):
                img = images[i % 10]
                ctx = {**POD_INFO, "image": img.name, "csi.storage.k8s.io/pod.name": f"p{i}"}
                jobs.append((f"csi-{i:04d}", node.target(f"pod{i}"), ctx, img))
            with ThreadPoolExecutor(100) as pool:
                list(
                    pool.map(
                        lambda j: node.stubs.node.NodePublishVolume(
                            publish_request(j[0], j[1], j[2]), timeout=300
                        ),
                        jobs,
                    )
                )
            # every object of every image was downloaded exactly once
            counts = ng.request_counts("/objects/")
            expected: set[str] = set()
            store = node.plugin.store
            for img in images:
                for d in store.image_objects(img.digest):
                    if d != img.digest:
                        expected.add("/objects/" + object_path(d).decode())
            assert expected <= set(counts)
            assert {u: n for u, n in counts.items() if n != 1} == {}
            # each target shows its image (one per image checked in full, all listed)
            seen: set[bytes] = set()
            for _vid, target, _ctx, img in jobs:
                if img.digest in seen:
                    assert sorted(p.name for p in target.iterdir()) == sorted(
                        p.name for p in img.source.iterdir()
                    )
                    continue
                seen.add(img.digest)
                diff = diff_snapshots(snapshot(img.source), snapshot(target))
                assert diff == [], diff[:10]
            assert len(mounts_under(node.pods)) == 100
            with ThreadPoolExecutor(50) as pool:
                list(
                    pool.map(
                        lambda j: node.stubs.node.NodeUnpublishVolume(
                            pb.NodeUnpublishVolumeRequest(volume_id=j[0], target_path=str(j[1]))
                        ),
                        jobs,
                    )
                )
            assert mounts_under(node.pods) == []
            assert all(not j[1].exists() for j in jobs)
            assert {h for h in store.leases() if h.startswith("csi-volume:")} == set()
            assert node.plugin.manager.dataplane.holders() == {}
        finally:
            node.close()
