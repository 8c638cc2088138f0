"""Fetch benchmark against nginx on loopback (issue 3, BRIEF §4 "publish" and "dedup" bars).

    python -m bench.fetch                       # full: ~1 GiB / 10k objects, 20k x 4 KiB
    python -m bench.fetch --quick               # CI-sized: 64 MiB / 1k objects, 2k x 4 KiB

(1) cold fetch of an image into an empty store vs ``curl --parallel`` downloading the same
    objects with the same parallelism: throughput ratio ours/curl (bar >= 0.5);
(2) a second image sharing 90% of its objects: bytes downloaded / image bytes (bar <= 0.11);
(3) objects per second for many 4 KiB objects.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import stat
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from csi.fetch import RepositoryClient, RepositoryConfig
from csi.image.fsverity import digest_bytes
from csi.image.tree import Node, Tree, object_path
from csi.image.writer import write_image
from csi.repo import Repository
from csi.store import Store
from tests.nginx import Nginx, static_server


def put_objects(repo: Repository, blobs: list[bytes]) -> list[tuple[bytes, int]]:
    """Write objects straight into the layout (benchmark setup: no fsync)."""
    out = []
    for b in blobs:
        d = digest_bytes(b)
        p = repo.object_path(d)
        p.parent.mkdir(exist_ok=True)
        if not p.exists():
            p.write_bytes(b)
        out.append((d, len(b)))
    return out


def make_image(repo: Repository, objs: list[tuple[bytes, int]], ref: str) -> bytes:
    root = Node(mode=stat.S_IFDIR | 0o755)
    for i, (d, size) in enumerate(objs):
        sub = root.entries.get(f"d{i // 1000:03d}".encode()) if root.entries else None
        if sub is None:
            sub = Node(mode=stat.S_IFDIR | 0o755)
            root.add(f"d{i // 1000:03d}".encode(), sub)
        assert isinstance(sub, Node)
        sub.add(
            f"f{i:06d}".encode(),
            Node(mode=stat.S_IFREG | 0o644, size=size, payload=object_path(d), digest=d),
        )
    digest = repo.add_image(write_image(Tree(root)))
    repo.set_ref(ref, digest)
    return digest


def sizes_for(n: int, total: int, rnd: random.Random) -> list[int]:
    """``n`` sizes summing to about ``total``: log-uniform between mean/16 and mean*4."""
    mean = total / n
    raw = [mean * 2 ** rnd.uniform(-4, 2) for _ in range(n)]
    k = total / sum(raw)
    return [max(65, int(s * k)) for s in raw]


def blobs(sizes: list[int], rnd: random.Random) -> list[bytes]:
    return [rnd.randbytes(s) for s in sizes]


def settle(repo: Repository, objs: list[tuple[bytes, int]], drop: bool) -> None:
    """Start a measurement from the same memory state each time: write back and drop the page
    cache (as root), then read the served objects back into it. Without this, whoever runs
    after the previous run's gigabyte of writes pays for reclaiming it (curl's own time moved
    between 1.15 s and 4.3 s that way)."""
    subprocess.run(["sync"], check=True)
    if not drop:
        return
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    for d, _ in objs:
        repo.object_path(d).read_bytes()
    for p in (repo.root / "images").iterdir():
        if p.is_file():
            p.read_bytes()


def run_curl(urls: list[str], out: Path, parallel: int) -> tuple[float, float]:
    """(seconds for curl, seconds for curl plus syncing its output to disk)."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = out / "curl.cfg"
    with open(cfg, "w") as f:
        for i, u in enumerate(urls):
            f.write(f'url = "{u}"\noutput = "{out}/{i}"\n')
    t0 = time.perf_counter()
    subprocess.run(
        [
            "curl",
            "--silent",
            "--no-progress-meter",
            "--fail",
            "--parallel",
            "--parallel-max",
            str(parallel),
            "--parallel-immediate",
            "-K",
            str(cfg),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    dt = time.perf_counter() - t0
    subprocess.run(["sync", "-f", str(out)], check=True)
    dt_sync = time.perf_counter() - t0
    return dt, dt_sync


def run_ours(url: str, ref: str, store_dir: Path, concurrency: int) -> tuple[float, int]:
    cfg = RepositoryConfig(
        name="bench", urls=(url,), allow_plain_http=True, concurrency=concurrency
    )
    with Store(store_dir) as store, RepositoryClient(cfg) as client:
        t0 = time.perf_counter()
        res = client.fetch_image(ref, store)
        dt = time.perf_counter() - t0
    return dt, res.bytes_downloaded


def run_store_only(
    repo: Repository, objs: list[tuple[bytes, int]], store_dir: Path, concurrency: int
) -> float:
    """Insert the same objects, read into memory first, through ``Store.ensure`` (no HTTP)."""
    from concurrent.futures import ThreadPoolExecutor

    datas = [(d, repo.object_path(d).read_bytes()) for d, _ in objs]
    with Store(store_dir) as store, ThreadPoolExecutor(concurrency) as pool:

        def put(item: tuple[bytes, bytes]) -> None:
            store.ensure(item[0], lambda w: w.write(item[1]))

        t0 = time.perf_counter()
        list(pool.map(put, datas))
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized run")
    ap.add_argument("--objects", type=int, help="objects in the large image (default 10000)")
    ap.add_argument("--total-mib", type=int, help="size of the large image (default 1024)")
    ap.add_argument("--small", type=int, help="4 KiB objects for objects/s (default 20000)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cold-only", action="store_true", help="only measurement (1)")
    ap.add_argument("--workdir", type=Path, help="where to build (default: a temp dir)")
    ap.add_argument(
        "--keep-caches",
        action="store_true",
        help="do not drop the page cache before each measurement (it is dropped when root)",
    )
    args = ap.parse_args()
    drop = not args.keep_caches and os.geteuid() == 0
    n = args.objects or (1000 if args.quick else 10_000)
    total = (args.total_mib or (64 if args.quick else 1024)) << 20
    n_small = args.small or (2000 if args.quick else 20_000)
    rnd = random.Random(1)

    with tempfile.TemporaryDirectory(prefix="bench-fetch-", dir=args.workdir) as tmp:
        work = Path(tmp)
        repo = Repository(work / "repo", create=True)
        t0 = time.perf_counter()
        a_sizes = sizes_for(n, total, rnd)
        a = put_objects(repo, blobs(a_sizes, rnd))
        keep = int(n * 0.9)
        b_new = put_objects(repo, blobs(sizes_for(n - keep, total * (n - keep) // n, rnd), rnd))
        b = a[:keep] + b_new
        small = put_objects(repo, blobs([4096] * n_small, rnd))
        img_a = make_image(repo, a, "large:a")
        img_b = make_image(repo, b, "large:b")
        make_image(repo, small, "small:v1")
        a_bytes = sum(s for _, s in a)
        print(
            f"setup: {n} objects / {a_bytes / 2**20:.0f} MiB, {n_small} x 4 KiB objects "
            f"({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )

        with Nginx(work / "nginx", [static_server(repo.root)], access_log=False) as ng:
            base = f"http://127.0.0.1:{ng.port}/"
            urls = [f"{base}objects/{d.hex()[:2]}/{d.hex()[2:]}" for d, _ in a]
            curl_t, curl_sync_t, ours_t, store_t = [], [], [], []
            # Nothing is deleted between measurements (only at the end): on ext4 without a
            # journal, as here, creating files soon after deleting many skips the freed
            # inodes one by one (find_inode_bit -> recently_deleted); whoever ran right
            # after a deletion would pay for it.
            for r in range(args.runs):
                settle(repo, a, drop)
                ct, cst = run_curl(urls, work / f"curl-out{r}", args.concurrency)
                curl_t.append(ct)
                curl_sync_t.append(cst)
                settle(repo, a, drop)
                dt, _ = run_ours(base, "large:a", work / f"store-a{r}", args.concurrency)
                ours_t.append(dt)
                settle(repo, a, drop)
                store_t.append(run_store_only(repo, a, work / f"store-o{r}", args.concurrency))
            c, o = statistics.median(curl_t), statistics.median(ours_t)
            cs = statistics.median(curl_sync_t)
            print(
                f"(1) cold fetch {n} objects, {a_bytes / 2**20:.0f} MiB, parallel "
                f"{args.concurrency}: curl {c:.2f} s ({a_bytes / c / 1e6:.0f} MB/s), "
                f"composefs-csi {o:.2f} s ({a_bytes / o / 1e6:.0f} MB/s): "
                f"ratio {c / o:.2f} (bar >= 0.5); against curl + sync of its output "
                f"({cs:.2f} s): {cs / o:.2f}; the same objects from memory into a store "
                f"alone (no HTTP): {statistics.median(store_t):.2f} s",
                flush=True,
            )

            if args.cold_only:
                return
            store_dir = work / "store-dedup"
            run_ours(base, "large:a", store_dir, args.concurrency)
            _, got = run_ours(base, "large:b", store_dir, args.concurrency)
            b_bytes = sum(s for _, s in b) + repo.image_path(img_b).stat().st_size
            print(
                f"(2) second image sharing 90% of objects: downloaded {got / 2**20:.1f} MiB "
                f"of {b_bytes / 2**20:.1f} MiB: ratio {got / b_bytes:.3f} (bar <= 0.11)",
                flush=True,
            )
            shutil.rmtree(store_dir)
            del img_a

            rates = []
            for r in range(args.runs):
                dt, _ = run_ours(base, "small:v1", work / f"store-s{r}", args.concurrency)
                rates.append(n_small / dt)
                shutil.rmtree(work / f"store-s{r}")
            small_urls = [f"{base}objects/{d.hex()[:2]}/{d.hex()[2:]}" for d, _ in small]
            cs1, _ = run_curl(small_urls, work / "curl-small", args.concurrency)
            shutil.rmtree(work / "curl-small")
            print(
                f"(3) {n_small} x 4 KiB objects: {statistics.median(rates):.0f} objects/s "
                f"(curl --parallel: {n_small / cs1:.0f} objects/s)",
                flush=True,
            )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    main()
