"""Publish benchmark of the node plugin (issue 5, BRIEF §4 "publish" bar), as kubelet calls it:
NodePublishVolume over the plugin's Unix socket, the real FUSE data plane, a repository served
by nginx on loopback.

    python -m bench.publish              # warm: 100 publishes; cold: a 1 GiB image
    python -m bench.publish --quick      # CI-sized: cold image of 64 MiB

(1) warm publish latency (image already in the store) over 100 publishes to 100 targets that
    stay published: p50 (bar <= 50 ms) and p99 (bar <= 200 ms); unpublish latency for reference;
(2) cold eager publish of a large image (every object fetched before the call returns):
    seconds and MiB/s, and the ratio to ``curl --parallel`` downloading the same objects.
Needs root (bind mounts, FUSE).
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.fetch import blobs, make_image, put_objects, run_curl, sizes_for
from csi.image.tree import object_path
from csi.repo import Repository
from csi.server.proto import csi_pb2 as pb
from tests._serverkit import POD_INFO, NodeHarness, publish_request
from tests.nginx import Nginx, static_server


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized cold image (64 MiB)")
    ap.add_argument("--publishes", type=int, default=100)
    ap.add_argument("--cold-mib", type=int, help="size of the cold image (default 1024)")
    ap.add_argument("--cold-objects", type=int, help="objects in the cold image (default 2000)")
    ap.add_argument("--workdir", type=Path, help="where to build (default: a temp dir)")
    args = ap.parse_args()
    cold_mib = args.cold_mib or (64 if args.quick else 1024)
    cold_n = args.cold_objects or (500 if args.quick else 2000)
    work = Path(tempfile.mkdtemp(prefix="bench-publish-", dir=args.workdir))
    rnd = random.Random(5)
    try:
        repo = Repository(work / "repo", create=True)
        warm_objs = put_objects(repo, blobs(sizes_for(1000, 32 << 20, rnd), rnd))
        make_image(repo, warm_objs, "warm")
        cold_objs = put_objects(repo, blobs(sizes_for(cold_n, cold_mib << 20, rnd), rnd))
        make_image(repo, cold_objs, "cold")
        cold_bytes = sum(s for _, s in cold_objs)
        with Nginx(work / "nginx", [static_server(repo.root)], workers=2) as ng:
            url = f"http://127.0.0.1:{ng.port}/"
            node = NodeHarness(work / "node", url)
            try:
                n = node.stubs.node
                # (1) warm
                first = node.target("prime")
                n.NodePublishVolume(publish_request("prime", first, {**POD_INFO, "image": "warm"}))
                lat: list[float] = []
                targets = []
                for i in range(args.publishes):
                    t = node.target(f"w{i}")
                    req = publish_request(f"w{i}", t, {**POD_INFO, "image": "warm"})
                    t0 = time.perf_counter()
                    n.NodePublishVolume(req)
                    lat.append(time.perf_counter() - t0)
                    targets.append((f"w{i}", t))
                ulat: list[float] = []
                for vid, t in [*targets, ("prime", first)]:
                    t0 = time.perf_counter()
                    n.NodeUnpublishVolume(
                        pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(t))
                    )
                    ulat.append(time.perf_counter() - t0)
                p50, p99 = pct(lat, 50) * 1000, pct(lat, 99) * 1000
                print(
                    f"(1) warm publish, {args.publishes} publishes of a 1000-file image: "
                    f"p50 {p50:.1f} ms (bar 50), p99 {p99:.1f} ms (bar 200), "
                    f"max {max(lat) * 1000:.1f} ms, mean {statistics.mean(lat) * 1000:.1f} ms; "
                    f"unpublish p50 {pct(ulat, 50) * 1000:.1f} ms, "
                    f"p99 {pct(ulat, 99) * 1000:.1f} ms"
                )
                # (2) cold
                t = node.target("cold")
                t0 = time.perf_counter()
                n.NodePublishVolume(
                    publish_request("cold", t, {**POD_INFO, "image": "cold"}), timeout=3600
                )
                cold = time.perf_counter() - t0
                n.NodeUnpublishVolume(
                    pb.NodeUnpublishVolumeRequest(volume_id="cold", target_path=str(t))
                )
            finally:
                node.close()
            urls = [url + "objects/" + object_path(d).decode() for d, _ in cold_objs]
            curl_s, curl_sync_s = run_curl(urls, work / "curl", 16)
        mib = cold_bytes / 2**20
        print(
            f"(2) cold eager publish of {cold_n} objects, {mib:.0f} MiB: {cold:.2f} s, "
            f"{mib / cold:.0f} MiB/s; curl --parallel 16: {curl_s:.2f} s, "
            f"{mib / curl_s:.0f} MiB/s; "
            f"ratio {curl_s / cold:.2f} (bar >= 0.5); with curl's output synced to disk "
            f"({curl_sync_s:.2f} s) ratio {curl_sync_s / cold:.2f}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
