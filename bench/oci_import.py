"""OCI import benchmark against Debian's docker-registry on loopback (issue 15).

    python -m bench.oci_import                 # full: a 1 GiB single-layer image
    python -m bench.oci_import --quick         # CI-sized: 64 MiB

(1) ``composefs-csi import docker://...`` into a fresh repository against what an OCI pull
    costs without us: ``skopeo copy docker://... oci:DIR`` + ``umoci raw unpack`` of it
    (the same image, the same registry, the same run). Ratio ours / theirs (bar <= 1.5).
(2) a second tag sharing 90% of its file bytes (files drawn at random get new contents until
    they hold 10% of the bytes), imported into the repository holding the first: how much the
    repository grew (new objects, the image, its provenance record) / the tag's file bytes
    (bar <= 0.11).

The image: files of log-uniform sizes (8 KiB .. 2 MiB, mean ~128 KiB), half of each file random
bytes and half text-like (so gzip has work to do: about 1.5x overall), in one gzip layer made by
``umoci raw add-layer``. Images are kept in ``--workdir`` between runs. Before each measurement
the page cache is written back and dropped (as root) and the registry's blobs read back in, so
both contenders start from the same state: the registry warm, the destination cold. Nothing
made by a measurement is deleted before the last one (see bench/build.py on ext4 inode reuse).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from tests.ocikit import Registry, registry, run, tools_missing

TEXT = b" ".join(
    random.Random(0).choice([b"layer", b"image", b"model", b"weight", b"token", b"composefs",
                             b"object", b"digest", b"kernel", b"overlay", b"\n"])
    for _ in range(400_000)
)  # fmt: skip


def file_sizes(total: int, rng: random.Random) -> list[int]:
    sizes = []
    while sum(sizes) < total:
        sizes.append(int(8192 * 2 ** rng.uniform(0, 8)))
    return sizes


def content(rng: random.Random, size: int) -> bytes:
    half = size // 2
    start = rng.randrange(0, len(TEXT) - half)
    return rng.randbytes(size - half) + TEXT[start : start + half]


def write_layer(path: Path, sizes: list[int], seed: int, changed: set[int]) -> int:
    """A tar of ``dNN/fNNNNN`` files; file ``i`` gets content from ``seed`` unless ``i`` is in
    ``changed`` (then from another seed). Returns the bytes of file content."""
    total = 0
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for d in range(len(sizes) // 100 + 1):
            ti = tarfile.TarInfo(f"d{d:02d}")
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tf.addfile(ti)
        for i, size in enumerate(sizes):
            rng = random.Random((seed + 1 if i in changed else seed) * 1_000_003 + i)
            data = content(rng, size)
            ti = tarfile.TarInfo(f"d{i // 100:02d}/f{i:05d}")
            ti.size, ti.mode, ti.mtime = size, 0o644, 1_700_000_000
            tf.addfile(ti, _Reader(data))
            total += size
    return total


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        out = self.data[self.pos : end]
        self.pos += len(out)
        return out


def prepare(work: Path, total: int) -> tuple[Path, int, int]:
    """The OCI layout with tags v1 and v2 (made once per size); (layout, bytes v1, bytes v2)."""
    layout = work / f"layout-{total >> 20}m-v2"
    meta = layout.with_suffix(".json")
    if meta.exists():
        m = json.loads(meta.read_text())
        return layout, m["v1"], m["v2"]
    shutil.rmtree(layout, ignore_errors=True)
    rng = random.Random(7)
    sizes = file_sizes(total, rng)
    # The second tag shares 90% of the bytes: files drawn at random get new contents until
    # they hold 10% of the bytes.
    changed: set[int] = set()
    order = list(range(len(sizes)))
    random.Random(8).shuffle(order)
    for i in order:
        if sum(sizes[j] for j in changed) + sizes[i] > total // 10:
            continue
        changed.add(i)
    t0 = time.perf_counter()
    bytes_of = {}
    run("umoci", "init", "--layout", layout)
    for tag, ch in (("v1", set()), ("v2", changed)):
        tar = work / f"{tag}.tar"
        bytes_of[tag] = write_layer(tar, sizes, 1, ch)
        run("umoci", "new", "--image", f"{layout}:{tag}")
        run("umoci", "raw", "add-layer", "--image", f"{layout}:{tag}", tar)
        tar.unlink()
    meta.write_text(json.dumps(bytes_of))
    print(f"setup: {len(sizes)} files, {total >> 20} MiB ({time.perf_counter() - t0:.0f} s)")
    return layout, bytes_of["v1"], bytes_of["v2"]


def settle(reg: Registry, drop: bool) -> None:
    subprocess.run(["sync"], check=True)
    if drop:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    for p in (reg.root / "data").rglob("data"):  # the registry's blobs: served warm
        with open(p, "rb") as f:
            while f.read(1 << 20):
                pass


def repo_bytes(repo: Path) -> int:
    """Bytes of every file stored in a repository (the temp area aside)."""
    return sum(
        p.stat().st_size
        for p in repo.rglob("*")
        if p.is_file() and not p.is_symlink() and ".tmp" not in p.parts
    )


def timed(*cmd: str | Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [str(c) for c in cmd], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return time.perf_counter() - t0


def ours(ref: str, repo: Path) -> tuple[float, dict[str, int]]:
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "csi.cli.main", "import", ref, "--repo", str(repo),
         "--plain-http", "--json"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return time.perf_counter() - t0, json.loads(out)


def theirs(ref: str, out: Path) -> tuple[float, float]:
    out.mkdir()
    copy = timed(
        "skopeo", "copy", "-q", "--insecure-policy", "--src-tls-verify=false", ref,
        f"oci:{out / 'layout'}:x",
    )  # fmt: skip
    unpack = timed("umoci", "raw", "unpack", "--image", f"{out / 'layout'}:x", out / "rootfs")
    return copy, unpack


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized run (64 MiB)")
    ap.add_argument("--total-mib", type=int, help="image size (default 1024)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/cfs-bench-oci"))
    ap.add_argument("--keep-caches", action="store_true", help="do not drop the page cache")
    args = ap.parse_args()
    reason = tools_missing()
    if reason:
        print(f"skipped: {reason}")
        return 0
    drop = not args.keep_caches and os.geteuid() == 0
    total = (args.total_mib or (64 if args.quick else 1024)) << 20
    args.workdir.mkdir(parents=True, exist_ok=True)
    layout, v1_bytes, v2_bytes = prepare(args.workdir, total)
    with tempfile.TemporaryDirectory(prefix="run-", dir=args.workdir) as tmp:
        work = Path(tmp)
        with registry(work / "registry") as reg:
            ref1 = reg.push(f"oci:{layout}:v1", "bench/img:v1")
            ref2 = reg.push(f"oci:{layout}:v2", "bench/img:v2")
            ours_t, copy_t, unpack_t = [], [], []
            for r in range(args.runs):
                settle(reg, drop)
                ours_t.append(ours(ref1, work / f"repo{r}")[0])
                settle(reg, drop)
                c, u = theirs(ref1, work / f"oci{r}")
                copy_t.append(c)
                unpack_t.append(u)
            o = statistics.median(ours_t)
            t = statistics.median([c + u for c, u in zip(copy_t, unpack_t, strict=True)])
            print(
                f"(1) import of a {v1_bytes / 2**20:.0f} MiB single-layer image: composefs-csi "
                f"import {o:.2f} s (runs {' '.join(f'{x:.2f}' for x in ours_t)}); skopeo copy + "
                f"umoci raw unpack {t:.2f} s (copy {statistics.median(copy_t):.2f} s, unpack "
                f"{statistics.median(unpack_t):.2f} s): ratio {o / t:.2f} (bar <= 1.5)",
                flush=True,
            )
            repo = work / "repo0"
            settle(reg, drop)
            before = repo_bytes(repo)
            _, second = ours(ref2, repo)
            grown = repo_bytes(repo) - before
            ratio = grown / v2_bytes
            print(
                f"(2) second tag sharing 90% of its file bytes: the repository grew by "
                f"{grown / 2**20:.1f} MiB for {v2_bytes / 2**20:.1f} MiB of files "
                f"({second['new_objects']} new objects of {second['new_bytes'] / 2**20:.1f} MiB, "
                f"{second['present_objects']} present; the rest is the image and its provenance"
                f" record): ratio {ratio:.3f} (bar <= 0.11)",
                flush=True,
            )
    return 0 if o / t <= 1.5 and ratio <= 0.11 else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    raise SystemExit(main())
