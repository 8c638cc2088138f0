"""Pulls over a network with latency, against an OCI pull of the same tree (issue 14).

    python -m bench.network                      # 10k files / 400 MB and 100k files / 1 GB
    python -m bench.network --trees 10k --rtts 20 --runs 1     # one cell
    python -m bench.network --quick              # 2k files / 64 MB, RTT 0 and 20 ms

Every pull goes through ``tests.support.latency.LatencyProxy`` (a TCP proxy on loopback that
adds the round-trip time; the kernel here has no netem), ours and OCI's alike, cold: the page
cache is written back and dropped (as root), and the served files read back into it, before
each pull. Measured, per tree and round-trip time, medians of ``--runs``:

- ours: ``composefs-csi pull REF`` into an empty store, from nginx serving a repository built
  with ``composefs-csi build --pack`` (``--layouts`` adds others: ``plain``, no packs;
  ``zstd``, packs compressed at level 3);
- OCI: ``skopeo copy`` from Debian's ``docker-registry`` into an OCI layout, then ``umoci raw
  unpack``, of the same tree as one gzip layer;
- the ratio ours / OCI (bar <= 1.0 at RTT 20 and 80 ms; <= 0.6 at RTT 0);
- a second version sharing 90% of the files, pulled into the store holding the first: bytes
  downloaded / the second version's bytes (bar <= 0.11);
- with ``--trees text``: a text-like tree (5k files, 200 MiB): bytes on the wire (counted by
  the proxy, both ways) against OCI's (bar <= 1.2), pull times at RTT 20 ms for each layout.

Trees, repositories and the registry are kept in ``--workdir`` between runs (built once).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import oci
from tests.nginx import Nginx, static_server
from tests.support.latency import LatencyProxy

CLI = str(Path(sys.executable).with_name("composefs-csi"))


@dataclass(frozen=True)
class TreeSpec:
    name: str
    files: int
    total: int
    kind: str = "random"  # or "text"


TREES = {
    "10k": TreeSpec("10k", 10_000, 400_000_000),
    "100k": TreeSpec("100k", 100_000, 1_000_000_000),
    "text": TreeSpec("text", 5_000, 200 << 20, "text"),
    "quick": TreeSpec("quick", 2_000, 64 << 20),
}
LAYOUT_FLAGS = {"plain": [], "pack": ["--pack"], "zstd": ["--pack", "--compress", "3"]}


def sizes_for(n: int, total: int, rnd: random.Random) -> list[int]:
    """``n`` sizes summing to about ``total``: log-uniform between mean/16 and mean*4."""
    mean = total / n
    raw = [mean * 2 ** rnd.uniform(-4, 2) for _ in range(n)]
    k = total / sum(raw)
    return [max(65, int(s * k)) for s in raw]


class TextMaker:
    """Text-like contents (lines of words and numbers; about 2x gzip-compressible)."""

    def __init__(self, rnd: random.Random) -> None:
        letters = "abcdefghijklmnopqrstuvwxyz_"
        words = ["".join(rnd.choices(letters, k=rnd.randint(2, 10))) for _ in range(5000)]
        self.lines = [
            (
                " ".join(rnd.choices(words, k=rnd.randint(3, 12))) + f" = {rnd.randint(0, 10**6)}\n"
            ).encode()
            for _ in range(50_000)
        ]
        self.rnd = rnd

    def make(self, size: int) -> bytes:
        out = b"".join(self.rnd.choices(self.lines, k=size // 40 + 2))
        while len(out) < size:
            out += out
        return out[:size]


def file_path(root: Path, i: int) -> Path:
    return root / f"d{i // 100:04d}" / f"f{i:06d}"


def make_tree(root: Path, spec: TreeSpec, seed: int) -> None:
    rnd = random.Random(seed)
    text = TextMaker(rnd) if spec.kind == "text" else None
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for i, size in enumerate(sizes_for(spec.files, spec.total, rnd)):
        p = file_path(tmp, i)
        if i % 100 == 0:
            p.parent.mkdir(parents=True)
        p.write_bytes(text.make(size) if text else rnd.randbytes(size))
    tmp.rename(root)


def make_v2(v1: Path, v2: Path, spec: TreeSpec, seed: int) -> None:
    """``v1`` with every tenth file's contents replaced (hard links for the rest)."""
    tmp = v2.with_name(v2.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(["cp", "-al", str(v1), str(tmp)], check=True)
    rnd = random.Random(seed)
    text = TextMaker(rnd) if spec.kind == "text" else None
    for i in range(0, spec.files, 10):
        p = file_path(tmp, i)
        size = p.stat().st_size
        p.unlink()
        p.write_bytes(text.make(size) if text else rnd.randbytes(size))
    tmp.rename(v2)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


@dataclass
class Prepared:
    spec: TreeSpec
    trees: dict[str, Path]
    repos: dict[str, Path]
    oci_layer: int
    v2_bytes: int


def prepare(work: Path, spec: TreeSpec, layouts: list[str], registry: oci.Registry) -> Prepared:
    base = work / spec.name
    base.mkdir(parents=True, exist_ok=True)
    v1, v2 = base / "tree-v1", base / "tree-v2"
    t0 = time.perf_counter()
    if not v1.exists():
        make_tree(v1, spec, seed=1)
    if not v2.exists():
        make_v2(v1, v2, spec, seed=2)
    repos = {}
    for layout in layouts:
        repo = base / f"repo-{layout}"
        # The last thing a build writes: the v2 ref, and with packs its pointer (a repository
        # built before pointers existed is built again).
        last = "packs/refs/t/v2" if LAYOUT_FLAGS[layout] else "images/refs/t/v2"
        if not (repo / last).exists():
            shutil.rmtree(repo, ignore_errors=True)
            for version, tree in (("v1", v1), ("v2", v2)):
                subprocess.run(
                    [CLI, "build", str(tree), "--repo", str(repo), "--ref", f"t/{version}"]
                    + LAYOUT_FLAGS[layout],
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
        repos[layout] = repo
    layout_dir = base / "oci-layout"
    if not (layout_dir / "index.json").exists():
        shutil.rmtree(layout_dir, ignore_errors=True)
        oci.make_layout(v1, layout_dir, "v1")
    registry.push(layout_dir, "v1", spec.name)
    layer = max(p.stat().st_size for p in (layout_dir / "blobs" / "sha256").iterdir())
    v2_bytes = sum(p.stat().st_size for p in v2.rglob("*") if p.is_file())
    print(f"setup {spec.name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return Prepared(spec, {"v1": v1, "v2": v2}, repos, layer, v2_bytes)


#: ext4 without a journal, as here, skips one by one the inodes freed less than 60 s ago
#: when it creates files, and those freed less than 360 s ago while their inode table block
#: is dirty (find_inode_bit -> recently_deleted; RECENTCY_MIN and RECENTCY_DIRTY in
#: fs/ext4/ialloc.c, 60 s since 2020): a pull of 100k files right after 200k were deleted took
#: 57 s instead of 20 s. The block is dirty when the allocator looks, not when the inode was
#: freed: a pull creating files dirties the very blocks it allocates from, so a `sync` after
#: deleting does not shorten the window. 65 s after deleting a 100k-file store (and a sync),
#: `recently_deleted` was still 41% of the workers' file-creation samples (`perf`); 6.5 min
#: after, file creation was 15% of their samples instead of 26%. Outputs are deleted between
#: cells, written back (sync), then this long is waited.
QUIET_AFTER_DELETE = 370.0


def forget(path: Path) -> None:
    """Delete a measurement's output, then wait until file creation is not slowed by it."""
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run(["sync"], check=True)
        time.sleep(QUIET_AFTER_DELETE)


def settle(drop: bool, served: list[Path]) -> None:
    """The same memory state before each pull: dirty pages written back, the page cache
    dropped (as root), the served files read back in."""
    subprocess.run(["sync"], check=True)
    if not drop:
        return
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    for root in served:
        subprocess.run(
            f"find {root} -type f -print0 | xargs -0 -r cat > /dev/null", shell=True, check=True
        )


def pull_ours(port: int, path: str, ref: str, store: Path, concurrency: int) -> tuple[float, int]:
    """``composefs-csi pull`` of the repository served at ``/path/``: (seconds, bytes)."""
    t0 = time.perf_counter()
    r = subprocess.run(
        [
            CLI,
            "pull",
            ref,
            "--repository",
            f"http://127.0.0.1:{port}/{path}/",
            "--store",
            str(store),
            "--allow-plain-http",
            "--concurrency",
            str(concurrency),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    dt = time.perf_counter() - t0
    got = int(r.stderr.split(" bytes downloaded")[0].rsplit(" ", 1)[1])
    return dt, got


@dataclass
class Cell:
    times: dict[str, list[float]] = field(default_factory=dict)
    wire: dict[str, list[int]] = field(default_factory=dict)

    def add(self, who: str, t: float, wire: int) -> None:
        self.times.setdefault(who, []).append(t)
        self.wire.setdefault(who, []).append(wire)

    def med(self, who: str) -> float:
        return statistics.median(self.times[who])


def run_tree(
    args: argparse.Namespace, work: Path, p: Prepared, nginx_port: int, registry: oci.Registry
) -> list[str]:
    served = [*p.repos.values(), registry.storage]
    out = work / "out"
    lines = []
    contenders = [f"{layout}/c{c}" for layout in p.repos for c in args.concurrency]
    for rtt in args.rtts:
        cell = Cell()
        for r in range(args.runs):
            order = ["oci", *contenders]
            if r % 2:
                order.reverse()
            for who in order:
                settle(args.drop, served)
                dest = out / f"{p.spec.name}-{rtt}-{r}-{who.replace('/', '-')}"
                if who == "oci":
                    with LatencyProxy(registry.port, rtt / 1000) as proxy:
                        res = oci.pull(proxy.port, p.spec.name, "v1", dest)
                    cell.add(who, res.seconds, proxy.bytes_down + proxy.bytes_up)
                else:
                    layout, conc = who.split("/c")
                    path = str(p.repos[layout].relative_to(work))
                    with LatencyProxy(nginx_port, rtt / 1000) as proxy:
                        dt, _ = pull_ours(proxy.port, path, "t/v1", dest, int(conc))
                    cell.add(who, dt, proxy.bytes_down + proxy.bytes_up)
                print(
                    f"  {p.spec.name} rtt {rtt} ms round {r + 1} {who}: "
                    f"{cell.times[who][-1]:.2f} s, {cell.wire[who][-1] / 1e6:.1f} MB on the wire",
                    flush=True,
                )
        o = cell.med("oci")
        for who in contenders:
            m = cell.med(who)
            wire = statistics.median(cell.wire[who]) / statistics.median(cell.wire["oci"])
            bar = "<= 0.6" if rtt == 0 else "<= 1.0"
            lines.append(
                f"{p.spec.name:5} rtt {rtt:3} ms  {who:12} {m:6.2f} s  oci {o:6.2f} s  "
                f"ratio {m / o:.2f} (bar {bar})  wire {wire:.2f}x oci "
                f"[runs: {' '.join(f'{t:.2f}' for t in cell.times[who])} | oci "
                f"{' '.join(f'{t:.2f}' for t in cell.times['oci'])}]"
            )
            print(lines[-1], flush=True)
        forget(out)
    return lines


def dedup(work: Path, p: Prepared, nginx_port: int) -> list[str]:
    lines = []
    for layout, repo in p.repos.items():
        store = work / "out" / f"dedup-{p.spec.name}-{layout}"
        path = str(repo.relative_to(work))
        pull_ours(nginx_port, path, "t/v1", store, 16)
        _, got = pull_ours(nginx_port, path, "t/v2", store, 16)
        lines.append(
            f"{p.spec.name:5} {layout:5} second version sharing 90% of files: downloaded "
            f"{got / 1e6:.1f} MB of {p.v2_bytes / 1e6:.1f} MB: ratio {got / p.v2_bytes:.3f} "
            "(bar <= 0.11)"
        )
        print(lines[-1], flush=True)
        forget(store)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small tree, RTT 0 and 20 ms")
    ap.add_argument("--trees", default="10k,100k", help="10k, 100k, text, quick")
    ap.add_argument("--rtts", default="0,20,80", help="round-trip times, ms")
    ap.add_argument("--layouts", default="pack", help="plain, pack, zstd (comma-separated)")
    ap.add_argument("--concurrency", default="16", help="our --concurrency values")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-dedup", action="store_true")
    ap.add_argument("--only-dedup", action="store_true", help="only the second-version measurement")
    ap.add_argument("--workdir", type=Path, help="kept between runs (default: a temp dir)")
    ap.add_argument("--keep-caches", action="store_true", help="do not drop the page cache")
    args = ap.parse_args()
    if args.quick:
        args.trees, args.rtts, args.runs = "quick", "0,20", 1
    args.rtts = [int(x) for x in args.rtts.split(",")]
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    args.drop = not args.keep_caches and os.geteuid() == 0
    missing = oci.tools_missing()
    if missing:
        raise SystemExit(f"bench.network needs {', '.join(missing)} (scripts/setup.sh)")
    layouts = args.layouts.split(",")
    specs = [TREES[t] for t in args.trees.split(",")]
    if "text" in args.trees and "zstd" not in layouts:
        layouts.append("zstd")
    with tempfile.TemporaryDirectory(prefix="bench-net-") as scratch:
        work = args.workdir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        results: list[str] = []
        with oci.Registry(work / "registry") as registry:
            prepared = [prepare(work, s, layouts, registry) for s in specs]
            # One nginx serves every repository, each at /<tree>/repo-<layout>/.
            with Nginx(work / "nginx", [static_server(work)], access_log=False) as ng:
                for p in prepared:
                    if not args.only_dedup:
                        results += run_tree(args, work, p, ng.port, registry)
                    if not args.no_dedup:
                        results += dedup(work, p, ng.port)
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        print("\n".join(["", f"summary (load average at the end: {load})", *results]))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    main()
