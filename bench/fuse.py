"""FUSE data plane benchmark (issues 4 and 13; BRIEF §4 "read speed", "metadata", "small
files" and "memory" bars).

    python -m bench.fuse                       # everything below, full size
    python -m bench.fuse --quick               # smoke run: smaller trees, one round
    python -m bench.fuse --only small,walk     # some of: reads, walk, small, memory
    python -m bench.fuse --small-files 50000   # a bigger small-file tree (~2 GB)
    python -m bench.fuse --workdir DIR         # keep the generated store in DIR between runs
    python -m bench.fuse --file-handles        # serve as with stock pyfuse3, for comparison
    python -m bench.fuse --no-readahead        # without reading a directory's next files ahead

Needs root (drop_caches, mounts, FUSE) and kernel composefs support. Measured in one run,
medians of ``--rounds``:

(1) ``reads``: large sequential reads (1 MiB ``readinto``) through FUSE vs reading the object
    files directly: cold (``echo 3 > /proc/sys/vm/drop_caches`` before each) and warm;
    bars: FUSE/direct >= 0.5 cold, >= 0.9 warm;
(2) ``walk``: ``find DIR -printf`` of every entry's stat fields (inode, size, mode, owner,
    times: a walk that lstat()s every entry) over a 20k-file image through FUSE vs a kernel
    composefs mount of the same image, cold and warm; bars: FUSE/kernel <= 1.5 cold, <= 1.2
    warm. ``find -ls`` (which also reads every symlink target) is shown warm for information;
(3) ``small``: ``find DIR -type f -print0 | xargs -0 cat`` of a generated tree of 10k files
    (``--small-files``; log-normal sizes 1 KiB..1 MiB, median 16 KiB, ~400 MB; 50 files per
    directory), every file an object, through FUSE vs the kernel composefs mount of the same
    image over the same objects, cold and warm; bars: FUSE/kernel <= 2.0 cold, <= 1.3 warm.
    Also the FUSE requests the daemon served per file (from its
    ``composefs_csi_fuse_operations_total`` metric), by operation;
(4) ``memory``: RSS of the daemon serving 10 images, and with 100 read-only bind mounts of
    those views (10 volumes per image) all walked; bar: <= 150 MB.

Exits 1 if a bar is not met.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from csi.image.fsverity import digest_bytes, digest_file
from csi.image.tree import S_IFDIR, S_IFLNK, S_IFREG, Node, Tree, object_path
from csi.image.writer import write_image
from csi.store import Store
from tests.fuse_helpers import Daemon, run_daemon
from tests.support.kernel import mount_composefs

_BUF = 1 << 20


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_all(paths: list[Path]) -> int:
    buf = bytearray(_BUF)
    view = memoryview(buf)
    total = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                total += n
    return total


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


#: ``find`` printing what ``stat`` gives about every entry (inode, size, mode, owner, times):
#: every entry is stat'ed, no symlink is read.
_FIND_STAT = "%i %s %m %U %G %n %T@ %C@\\n"


def walk(root: Path, fmt: str = _FIND_STAT) -> None:
    subprocess.run(["find", str(root), "-printf", fmt], stdout=subprocess.DEVNULL, check=True)


def walk_ls(root: Path) -> None:
    """``find -ls``: also reads every symlink target."""
    subprocess.run(["find", str(root), "-ls"], stdout=subprocess.DEVNULL, check=True)


# -- setup ---------------------------------------------------------------------------------------


def _store_object(store: Path, data: bytes) -> bytes:
    d = digest_bytes(data)
    p = store / "objects" / object_path(d).decode()
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return d


def large_files_image(store: Path, count: int, size: int) -> tuple[bytes, list[str]]:
    root = Node(mode=S_IFDIR | 0o755)
    rng = random.Random(1)
    names = []
    for i in range(count):
        tmp = store / f"large-{i}.tmp"
        with open(tmp, "wb") as f:
            left = size
            while left:
                n = min(left, 8 << 20)
                f.write(rng.randbytes(n))
                left -= n
        d = digest_file(tmp)
        p = store / "objects" / object_path(d).decode()
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(p)
        name = f"large-{i}.bin"
        root.add(
            name.encode(),
            Node(mode=S_IFREG | 0o644, size=size, payload=object_path(d), digest=d),
        )
        names.append(name)
    with Store(store) as s:
        return s.add_image_bytes(write_image(Tree(root))), names


def many_files_image(store: Path, files: int, seed: int) -> bytes:
    """``files`` entries in 100-entry directories: small inline files, small objects, links."""
    rng = random.Random(seed)
    root = Node(mode=S_IFDIR | 0o755)
    per_dir = 100
    for di in range(max(1, files // per_dir)):
        d = Node(mode=S_IFDIR | 0o755, mtime_sec=1_700_000_000 + di)
        root.add(f"d{di:04d}".encode(), d)
        for fi in range(per_dir):
            name = f"file-{fi:03d}".encode()
            r = rng.random()
            if r < 0.6:
                c = rng.randbytes(rng.randrange(1, 65))
                d.add(name, Node(mode=S_IFREG | 0o644, size=len(c), content=c))
            elif r < 0.9:
                data = rng.randbytes(rng.randrange(100, 4000))
                dg = _store_object(store, data)
                d.add(
                    name,
                    Node(mode=S_IFREG | 0o644, size=len(data), payload=object_path(dg), digest=dg),
                )
            else:
                d.add(name, Node(mode=S_IFLNK | 0o777, payload=b"../d0000"))
    with Store(store) as s:
        return s.add_image_bytes(write_image(Tree(root)))


#: Small-file tree: log-normal sizes (median 16 KiB, sigma 1.35: ~40 KB mean, so 10k files are
#: ~400 MB), kept within 1 KiB..1 MiB; 50 files per directory, 20 directories per parent.
SMALL_MEDIAN = 16 << 10
SMALL_SIGMA = 1.35
SMALL_MIN, SMALL_MAX = 1 << 10, 1 << 20


def small_file_sizes(files: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    mu = math.log(SMALL_MEDIAN)
    out = []
    while len(out) < files:
        s = int(rng.lognormvariate(mu, SMALL_SIGMA))
        if SMALL_MIN <= s <= SMALL_MAX:
            out.append(s)
    return out


def small_files_image(store: Path, files: int, seed: int) -> tuple[bytes, int]:
    """``files`` regular files of random content, every one an object; returns the image
    digest and the total size."""
    rng = random.Random(seed)
    root = Node(mode=S_IFDIR | 0o755)
    per_dir, fanout = 50, 20
    total = 0
    parent = root
    d = root
    for i, size in enumerate(small_file_sizes(files, seed)):
        if i % (per_dir * fanout) == 0:
            parent = Node(mode=S_IFDIR | 0o755, mtime_sec=1_700_000_000)
            root.add(f"top{i // (per_dir * fanout):03d}".encode(), parent)
        if i % per_dir == 0:
            d = Node(mode=S_IFDIR | 0o755, mtime_sec=1_700_000_000)
            parent.add(f"dir{i // per_dir:05d}".encode(), d)
        data = rng.randbytes(size)
        dg = _store_object(store, data)
        node = Node(mode=S_IFREG | 0o644, size=size, payload=object_path(dg), digest=dg)
        d.add(f"file{i:06d}.dat".encode(), node)
        total += size
    with Store(store) as s:
        return s.add_image_bytes(write_image(Tree(root))), total


def prepare(work: Path, quick: bool, small_files: int) -> dict[str, object]:
    params = {"quick": quick, "small_files": small_files, "v": 4}
    state = work / "state.json"
    if state.exists():
        saved = json.loads(state.read_text())
        if saved.get("params") == params:
            return dict(saved)
    if work.exists():
        shutil.rmtree(work)
    store = work / "store"
    store.mkdir(parents=True)
    count, size = (2, 64 << 20) if quick else (4, 256 << 20)
    large, names = large_files_image(store, count, size)
    meta_files = 2000 if quick else 20_000
    meta = many_files_image(store, meta_files, seed=2)
    ten = [many_files_image(store, 500 if quick else 2000, seed=100 + i).hex() for i in range(10)]
    small, small_bytes = small_files_image(store, small_files, seed=3)
    out = {
        "small": small.hex(),
        "small_files": small_files,
        "small_bytes": small_bytes,
        "params": params,
        "large": large.hex(),
        "names": names,
        "meta": meta.hex(),
        "meta_files": meta_files + meta_files // 100,
        "ten": ten,
    }
    state.write_text(json.dumps(out))
    return out


# -- measurements -------------------------------------------------------------------------------


def bench_reads(d: Daemon, store: Path, large: bytes, names: list[str], rounds: int) -> dict:
    view = Path(d.client.add_view([large], "bench")["path"])
    fuse_files = [view / n for n in names]
    with object_files(store, large) as objs:
        direct_files = objs
    size = sum(p.stat().st_size for p in direct_files)
    res: dict[str, list[float]] = {
        "direct_cold": [],
        "fuse_cold": [],
        "direct_warm": [],
        "fuse_warm": [],
    }
    for _ in range(rounds):
        drop_caches()
        res["direct_cold"].append(size / timed(lambda: read_all(direct_files)))
        drop_caches()
        res["fuse_cold"].append(size / timed(lambda: read_all(fuse_files)))
        read_all(direct_files)
        res["direct_warm"].append(size / timed(lambda: read_all(direct_files)))
        read_all(fuse_files)
        res["fuse_warm"].append(size / timed(lambda: read_all(fuse_files)))
    return {k: statistics.median(v) for k, v in res.items()} | {"bytes": size}


@contextlib.contextmanager
def object_files(store: Path, digest: bytes) -> Iterator[list[Path]]:
    """The object files of an image, in image order."""
    from csi.image.reader import Image as Reader

    with Reader.open(store / "images" / digest.hex()) as img:
        paths = []
        for _name, nid, _ in img.readdir(img.root_nid):
            ref = img.backing(nid)
            if ref is not None and ref[1] is not None:
                paths.append(store / "objects" / object_path(ref[1]).decode())
        yield paths


def bench_walk(d: Daemon, store: Path, meta: bytes, rounds: int) -> dict:
    view = Path(d.client.add_view([meta], "bench")["path"])
    keys = (
        "fuse_cold",
        "kernel_cold",
        "fuse_warm",
        "kernel_warm",
        "fuse_ls_warm",
        "kernel_ls_warm",
    )
    res: dict[str, list[float]] = {k: [] for k in keys}
    with mount_composefs(store / "images" / meta.hex(), store / "objects") as k:
        for _ in range(rounds):
            drop_caches()
            res["kernel_cold"].append(timed(lambda: walk(k)))
            drop_caches()
            res["fuse_cold"].append(timed(lambda: walk(view)))
            walk(k)
            res["kernel_warm"].append(timed(lambda: walk(k)))
            walk(view)
            res["fuse_warm"].append(timed(lambda: walk(view)))
            walk_ls(k)
            res["kernel_ls_warm"].append(timed(lambda: walk_ls(k)))
            walk_ls(view)
            res["fuse_ls_warm"].append(timed(lambda: walk_ls(view)))
    return {k: statistics.median(v) for k, v in res.items()}


def cat_all(root: Path) -> None:
    """``find ROOT -type f -print0 | xargs -0 cat``: open and read every file, one at a time."""
    script = f"find '{root}' -type f -print0 | xargs -0 cat > /dev/null"
    subprocess.run(["sh", "-c", script], check=True)


def fuse_requests(metrics_port: int) -> dict[str, float]:
    """FUSE requests the daemon has served so far, by operation (from its metrics)."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith('composefs_csi_fuse_operations_total{op="'):
            op = line.split('"')[1]
            out[op] = float(line.rsplit(" ", 1)[1])
    return out


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def bench_small(d: Daemon, store: Path, small: bytes, rounds: int, metrics_port: int) -> dict:
    """Read every file of the small-file image: FUSE vs the kernel composefs mount."""
    view = Path(d.client.add_view([small], "bench")["path"])
    keys = ("kernel_cold", "fuse_cold", "kernel_warm", "fuse_warm")
    res: dict[str, list[float]] = {k: [] for k in keys}
    requests: dict[str, dict[str, float]] = {}
    with mount_composefs(store / "images" / small.hex(), store / "objects") as k:
        for _ in range(rounds):
            drop_caches()
            res["kernel_cold"].append(timed(lambda: cat_all(k)))
            drop_caches()
            before = fuse_requests(metrics_port)
            res["fuse_cold"].append(timed(lambda: cat_all(view)))
            requests["cold"] = _delta(fuse_requests(metrics_port), before)
            cat_all(k)
            res["kernel_warm"].append(timed(lambda: cat_all(k)))
            cat_all(view)
            before = fuse_requests(metrics_port)
            res["fuse_warm"].append(timed(lambda: cat_all(view)))
            requests["warm"] = _delta(fuse_requests(metrics_port), before)
    out: dict = {k: statistics.median(v) for k, v in res.items()}
    out["requests"] = requests
    return out


def bench_memory(d: Daemon, ten: list[bytes], work: Path) -> dict:
    base_kb = d.rss_kb()
    views = [Path(d.client.add_view([dg], f"bench-{i}")["path"]) for i, dg in enumerate(ten)]
    for v in views:
        walk(v)
    ten_kb = d.rss_kb()
    binds = work / "binds"
    binds.mkdir(exist_ok=True)
    mounted: list[Path] = []
    try:
        for i in range(100):
            target = binds / f"vol-{i:03d}"
            target.mkdir(exist_ok=True)
            subprocess.run(
                ["mount", "--bind", "-o", "ro", str(views[i % 10]), str(target)], check=True
            )
            mounted.append(target)
        for t in mounted:
            walk(t)
        hundred_kb = d.rss_kb()
    finally:
        for t in mounted:
            subprocess.run(["umount", str(t)], check=False)
    return {
        "idle_mb": base_kb / 1024,
        "ten_images_mb": ten_kb / 1024,
        "hundred_volumes_mb": hundred_kb / 1024,
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


PARTS = ("reads", "walk", "small", "memory")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument(
        "--small-files",
        type=int,
        default=None,
        help="files in the small-file tree (default 10000, ~400 MB; --quick: 2000)",
    )
    ap.add_argument(
        "--file-handles",
        action="store_true",
        help="serve as with stock pyfuse3 (every open and listing through the daemon)",
    )
    ap.add_argument(
        "--no-readahead",
        action="store_true",
        help="do not read the next files of a directory ahead (readahead_files 0), for comparison",
    )
    ap.add_argument(
        "--only",
        default=",".join(PARTS),
        help=f"comma-separated parts to run (default: all of {','.join(PARTS)})",
    )
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.fuse needs root (drop_caches, mounts)")
        return 2
    parts = set(args.only.split(","))
    if parts - set(PARTS):
        ap.error(f"unknown parts: {sorted(parts - set(PARTS))}")
    rounds = args.rounds or (1 if args.quick else 3)
    small_files = args.small_files or (2000 if args.quick else 10_000)
    work = args.workdir or Path(tempfile.gettempdir()) / (
        "cfs-bench-fuse" + ("-quick" if args.quick else "")
    )
    t0 = time.monotonic()
    st = prepare(work, args.quick, small_files)
    print(f"setup: {time.monotonic() - t0:.1f} s ({work})")
    print(f"load before: {os.getloadavg()[0]:.2f}")
    store = work / "store"
    port = _free_port()
    ok = True
    mb = 1e6
    extra: dict[str, object] = {"kernel_opens": False} if args.file_handles else {}
    if args.no_readahead:
        extra["readahead_files"] = 0
    with run_daemon(store, work=work, metrics_address=f"127.0.0.1:{port}", **extra) as d:
        if "reads" in parts:
            r = bench_reads(d, store, bytes.fromhex(str(st["large"])), list(st["names"]), rounds)  # type: ignore[arg-type]
            cold = r["fuse_cold"] / r["direct_cold"]
            warm = r["fuse_warm"] / r["direct_warm"]
            ok = ok and cold >= 0.5 and warm >= 0.9
            print(f"sequential read of {r['bytes'] / mb:.0f} MB (median of {rounds}):")
            print(
                f"  cold: direct {r['direct_cold'] / mb:.0f} MB/s, FUSE {r['fuse_cold'] / mb:.0f}"
                f" MB/s -> ratio {cold:.2f} (bar >= 0.5) {_verdict(cold >= 0.5)}"
            )
            print(
                f"  warm: direct {r['direct_warm'] / mb:.0f} MB/s, FUSE {r['fuse_warm'] / mb:.0f}"
                f" MB/s -> ratio {warm:.2f} (bar >= 0.9) {_verdict(warm >= 0.9)}"
            )
        if "walk" in parts:
            w = bench_walk(d, store, bytes.fromhex(str(st["meta"])), rounds)
            wc = w["fuse_cold"] / w["kernel_cold"]
            ww = w["fuse_warm"] / w["kernel_warm"]
            ok = ok and wc <= 1.5 and ww <= 1.2
            print(f"find + stat of every entry of the {st['meta_files']}-entry image (median):")
            print(
                f"  cold: kernel {w['kernel_cold']:.3f} s, FUSE {w['fuse_cold']:.3f} s"
                f" -> ratio {wc:.2f} (bar <= 1.5) {_verdict(wc <= 1.5)}"
            )
            print(
                f"  warm: kernel {w['kernel_warm']:.3f} s, FUSE {w['fuse_warm']:.3f} s"
                f" -> ratio {ww:.2f} (bar <= 1.2) {_verdict(ww <= 1.2)}"
            )
            ls = w["fuse_ls_warm"] / w["kernel_ls_warm"]
            print(
                f"  (find -ls, which also reads every symlink target, warm: kernel "
                f"{w['kernel_ls_warm']:.3f} s, FUSE {w['fuse_ls_warm']:.3f} s -> ratio {ls:.2f})"
            )
        if "small" in parts:
            n = int(str(st["small_files"]))
            s = bench_small(d, store, bytes.fromhex(str(st["small"])), rounds, port)
            sc = s["fuse_cold"] / s["kernel_cold"]
            sw = s["fuse_warm"] / s["kernel_warm"]
            ok = ok and sc <= 2.0 and sw <= 1.3
            print(
                f"read every file of the {n}-file / {int(str(st['small_bytes'])) / mb:.0f} MB"
                f" tree (find | xargs cat, median of {rounds}):"
            )
            for kind, ratio, bar in (("cold", sc, 2.0), ("warm", sw, 1.3)):
                reqs = s["requests"][kind]
                per_file = sum(reqs.values()) / n
                detail = ", ".join(f"{op} {v / n:.2f}" for op, v in sorted(reqs.items()))
                print(
                    f"  {kind}: kernel {s['kernel_' + kind]:.3f} s, FUSE {s['fuse_' + kind]:.3f} s"
                    f" -> ratio {ratio:.2f} (bar <= {bar}) {_verdict(ratio <= bar)};"
                    f" FUSE requests per file {per_file:.2f} ({detail or 'none'})"
                )
    if "memory" in parts:
        with run_daemon(store, work=work, **extra) as d:
            m = bench_memory(d, [bytes.fromhex(h) for h in st["ten"]], work)  # type: ignore[attr-defined]
        ok = ok and m["hundred_volumes_mb"] <= 150
        print(
            f"daemon RSS: idle {m['idle_mb']:.0f} MB, 10 images walked {m['ten_images_mb']:.0f}"
            f" MB, 100 bind-mounted volumes walked {m['hundred_volumes_mb']:.0f} MB (bar <= 150)"
            f" {_verdict(m['hundred_volumes_mb'] <= 150)}"
        )
    print(f"load after: {os.getloadavg()[0]:.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
