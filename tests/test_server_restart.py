"""Restart safety: the node plugin (a subprocess) is killed with SIGKILL while publishes are in
flight; published volumes keep working while it is down; after a restart every target is either
published (mounted, showing its image) or cleanly absent (no mount, no directory), and kubelet's
retries then publish everything and unpublishing leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest

from csi.server.mounts import mounts_at
from csi.server.proto import csi_pb2 as pb
from csi.store import Store
from tests._serverkit import (
    POD_INFO,
    DataPlaneProcess,
    Stubs,
    driver_config,
    fuse_problem,
    make_repo,
    mounts_under,
    node_process,
    publish_request,
)
from tests.nginx import NGINX, Nginx
from tests.support.snapshot import diff_snapshots, snapshot

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(600)]


def slow_server(root: Path) -> str:
    """Objects trickle out at 256 KiB/s so publishes are still running when we kill."""
    return f"""
    server {{
        listen 127.0.0.1:{{port}};
        root {root};
        location /objects/ {{ limit_rate 256k; }}
        location / {{ }}
    }}"""


def wait_ready(stubs: Stubs, proc: object) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            stubs.identity.Probe(pb.ProbeRequest(), timeout=5)
            return
        except grpc.RpcError:
            assert proc.poll() is None, "node plugin exited"
            assert time.monotonic() < deadline, "node plugin did not become ready"
            time.sleep(0.1)


def test_kill_mid_publish(tmp_path: Path) -> None:
    problem = fuse_problem()
    if problem:
        pytest.skip(problem)
    if NGINX is None:
        pytest.skip("nginx is not installed (scripts/setup.sh installs it)")
    images = make_repo(tmp_path, 6, n=80, seed0=7000)
    work = tmp_path / "node"
    work.mkdir()
    with Nginx(tmp_path / "nginx", [slow_server(tmp_path / "repo")]) as ng:
        url = f"http://127.0.0.1:{ng.port}/"
        _, config_path = driver_config(work, {"local": url}, rpc_wait=60)
        (work / "store").mkdir()
        Store(work / "store").close()
        dp = DataPlaneProcess(work, work / "store", {"local": url}).start()
        sock = work / "csi.sock"
        endpoint = f"unix://{sock}"
        pods = work / "pods"
        try:
            # one volume published before anything goes wrong
            first = pods / "first" / "mount"
            first.parent.mkdir(parents=True)
            with node_process(config_path, endpoint, "n1", work) as proc:
                stubs = Stubs(sock)
                wait_ready(stubs, proc)
                stubs.node.NodePublishVolume(
                    publish_request("v-first", first, {**POD_INFO, "image": images[0].name}),
                    timeout=300,
                )
                stubs.close()
            jobs = []
            for i in range(12):
                t = pods / f"p{i}" / "mount"
                t.parent.mkdir(parents=True)
                img = images[1 + i % 5]
                jobs.append((f"v-{i}", t, {**POD_INFO, "image": img.name}, img))
            for delay in (0.5, 0.05, 0.15):  # the first round is cold, later ones warm
                with node_process(config_path, endpoint, "n1", work) as proc:
                    stubs = Stubs(sock)
                    wait_ready(stubs, proc)
                    threads = [
                        threading.Thread(
                            target=_publish_quietly,
                            args=(stubs, publish_request(v, t, ctx)),
                            daemon=True,
                        )
                        for v, t, ctx, _img in jobs
                    ]
                    for th in threads:
                        th.start()
                    time.sleep(delay)
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    stubs.close()
                    for th in threads:
                        th.join(30)
                # while the plugin is down, the published volume keeps working
                assert diff_snapshots(snapshot(images[0].source), snapshot(first)) == []
                with node_process(config_path, endpoint, "n1", work) as proc:
                    stubs = Stubs(sock)
                    wait_ready(stubs, proc)
                    for _v, t, _ctx, img in jobs:
                        if mounts_at(t):
                            diff = diff_snapshots(snapshot(img.source), snapshot(t))
                            assert diff == [], diff[:5]
                        else:
                            assert not t.exists(), f"{t}: left behind without a mount"
                    # kubelet: unpublish everything it asked for (some were never published)
                    for v, t, _ctx, _img in jobs:
                        stubs.node.NodeUnpublishVolume(
                            pb.NodeUnpublishVolumeRequest(volume_id=v, target_path=str(t))
                        )
                    stubs.close()
                assert mounts_under(pods) == [str(first)]
            # finally: everything published for real, then removed
            with node_process(config_path, endpoint, "n1", work) as proc:
                stubs = Stubs(sock)
                wait_ready(stubs, proc)
                for v, t, ctx, img in jobs:
                    stubs.node.NodePublishVolume(publish_request(v, t, ctx), timeout=300)
                    assert diff_snapshots(snapshot(img.source), snapshot(t)) == []
                for v, t, _ctx, _img in [*jobs, ("v-first", first, {}, None)]:
                    stubs.node.NodeUnpublishVolume(
                        pb.NodeUnpublishVolumeRequest(volume_id=v, target_path=str(t))
                    )
                stubs.close()
            assert mounts_under(pods) == []
            with Store(work / "store") as store:
                assert {h for h in store.leases() if h.startswith("csi-volume:")} == set()
        finally:
            dp.stop()
            for m in mounts_under(pods):
                os.system(f"umount -l '{m}'")


def _publish_quietly(stubs: Stubs, req: pb.NodePublishVolumeRequest) -> None:
    with contextlib.suppress(grpc.RpcError):  # killed under it: kubelet would retry
        stubs.node.NodePublishVolume(req, timeout=60)
