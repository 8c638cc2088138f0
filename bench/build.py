"""Build benchmark (issue 2): ``composefs-csi build`` against ``sha256sum`` over the same files.

    python -m bench.build                      # ~20k files / 1 GB
    python -m bench.build --quick              # smoke run: 2k files / 64 MB, one measurement
    python -m bench.build --files N --total-bytes B --workdir DIR

The tree is generated deterministically (log-normal file sizes, median ~5 KB, a few large
files, ~3% duplicated contents, nested directories) and kept in WORKDIR/tree for later runs.
Nothing is dropped from the page cache: both contenders run warm (one unmeasured run each,
then the median of 3). Contenders:

- ``sha256sum``: ``find SRC -type f -print0 | xargs -0 -P1 sha256sum >/dev/null`` (and -P2);
- ``composefs-csi build SRC --repo REPO`` into a fresh repository each run (every object is
  hashed, copied and fsynced; the image is written), and again into a repository that already
  holds every object (hashing only).

Without the CLI, the build runs in-process (scan_directory + write_image + csi.repo).
The bar is build / sha256sum(-P1) <= 1.5.
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
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BAR = 1.5
_CHUNK = 1 << 20
_MAX_FILE = 64 << 20


def plan_sizes(files: int, total: int, seed: int = 20) -> list[int]:
    """Deterministic, realistic file sizes summing to ``total`` (log-normal, capped)."""
    rng = random.Random(seed)
    raw = [min(rng.lognormvariate(8.5, 2.2), _MAX_FILE) for _ in range(files)]
    scale = total / sum(raw)
    sizes = [min(int(s * scale), _MAX_FILE) for s in raw]
    # Put the rounding remainder on the largest files (keeping each under the cap).
    rest = total - sum(sizes)
    for i in sorted(range(files), key=lambda i: -sizes[i]):
        if rest <= 0:
            break
        add = min(rest, _MAX_FILE - sizes[i])
        sizes[i] += add
        rest -= add
    return sizes


def generate_tree(root: Path, files: int, total: int, seed: int = 20) -> None:
    """Create the benchmark tree below ``root`` (skipped when an identical one is there)."""
    params = {"files": files, "total": total, "seed": seed, "v": 1}
    stamp = root / ".bench-tree.json"
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        return
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    rng = random.Random(seed)
    sizes = plan_sizes(files, total, seed)
    dirs = [root]
    n_dirs = max(1, files // 25)
    for i in range(n_dirs):
        parent = dirs[rng.randrange(len(dirs))] if len(dirs) < 8 or rng.random() < 0.7 else root
        d = parent / f"dir{i:05d}"
        d.mkdir()
        dirs.append(d)
    earlier: list[tuple[int, int]] = []  # (size, content seed) of written files, for duplicates
    for i, size in enumerate(sizes):
        d = dirs[rng.randrange(len(dirs))]
        content_seed = i
        if earlier and rng.random() < 0.03:
            size, content_seed = earlier[rng.randrange(len(earlier))]
        earlier.append((size, content_seed))
        data_rng = random.Random(content_seed)
        with open(d / f"file{i:06d}.dat", "wb") as f:
            left = size
            while left:
                n = min(_CHUNK, left)
                f.write(data_rng.randbytes(n))
                left -= n
    stamp.write_text(json.dumps(params))


def _du(root: Path) -> tuple[int, int]:
    n = b = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            if name.startswith(".bench-tree"):
                continue
            n += 1
            b += os.lstat(os.path.join(dirpath, name)).st_size
    return n, b


def sha256sum_cmd(src: Path, parallel: int) -> Callable[[], None]:
    script = (
        f"find {_q(src)} -type f ! -name .bench-tree.json -print0 "
        f"| xargs -0 -P{parallel} sha256sum >/dev/null"
    )

    def run() -> None:
        subprocess.run(["sh", "-c", script], check=True)

    return run


def _q(p: Path) -> str:
    return "'" + str(p).replace("'", "'\\''") + "'"


def _cli() -> str | None:
    here = Path(sys.executable).parent / "composefs-csi"
    if here.exists():
        return str(here)
    return shutil.which("composefs-csi")


def _build_inprocess(src: Path, repo: Path) -> None:
    from csi.image.fromdir import ScanOptions, scan_directory
    from csi.image.writer import write_image
    from csi.repo import Repository

    repo.mkdir(parents=True, exist_ok=True)
    r = Repository(repo)
    result = scan_directory(src, ScanOptions())
    for digest, path, _size in result.objects:
        r.add_object_file(Path(path), digest, verify=False)
    r.add_image(write_image(result.tree))


def _build_cli(cli: str, src: Path, repo: Path) -> None:
    proc = subprocess.run(
        [cli, "build", str(src), "--repo", str(repo)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"composefs-csi build failed ({proc.returncode}): {proc.stderr[-800:]}")


def choose_builder() -> tuple[str, Callable[[Path, Path], None]]:
    """The CLI when it works (tried on a tiny tree), else the in-process equivalent."""
    cli = _cli()
    if cli is not None:
        with tempfile.TemporaryDirectory(prefix="bench-probe-") as tmp:
            (Path(tmp) / "src").mkdir()
            (Path(tmp) / "src" / "f").write_bytes(b"x" * 100)
            try:
                _build_cli(cli, Path(tmp) / "src", Path(tmp) / "repo")
                return f"CLI {cli}", lambda s, r: _build_cli(cli, s, r)
            except RuntimeError as e:
                last = str(e).strip().splitlines()[-1]
                print(f"note: the CLI cannot build yet ({last}); building in-process")
    return "in-process: scan_directory + write_image + csi.repo", _build_inprocess


def measure(
    run: Callable[[], None], repeats: int, *, setup: Callable[[], None] | None = None
) -> list[float]:
    """One unmeasured warm-up run, then ``repeats`` timed runs (``setup`` is not timed)."""
    if setup:
        setup()
    run()
    times = []
    for _ in range(repeats):
        if setup:
            setup()
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--total-bytes", type=int, default=1_000_000_000)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=None, help="measured runs (default 3)")
    ap.add_argument("--quick", action="store_true", help="2k files / 64 MB, one measured run")
    args = ap.parse_args(argv)
    if args.quick:
        args.files, args.total_bytes = 2_000, 64_000_000
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    workdir = args.workdir or Path(tempfile.gettempdir()) / "composefs-csi-bench-build"
    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / "tree"
    t0 = time.perf_counter()
    generate_tree(src, args.files, args.total_bytes)
    n_files, n_bytes = _du(src)
    print(
        f"tree: {n_files} files, {n_bytes / 1e6:.0f} MB in {src} "
        f"(ready in {time.perf_counter() - t0:.1f} s); CPUs: {os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.1f} (other load makes the figures noisy)"
    )
    how, build = choose_builder()
    print(f"build: {how}; each contender warmed once, then median of {args.repeats}")

    full_repo = workdir / "repo-populated"
    # Each fresh build gets a new directory; all are removed after the measurements. Removing
    # one just before the next build would time ext4's inode allocator instead of the build:
    # without a journal (as here) it skips inodes freed less than 60 s ago one by one
    # (find_inode_bit -> recently_deleted), so creating 20k files right after deleting 20k
    # costs seconds, for ``cp -r`` too.
    fresh_dirs: list[Path] = []
    for old in workdir.glob("repo-fresh*"):
        shutil.rmtree(old, ignore_errors=True)

    def new_fresh() -> None:
        fresh_dirs.append(workdir / f"repo-fresh-{len(fresh_dirs)}")

    try:
        rows: list[tuple[str, list[float]]] = [
            ("sha256sum (xargs -P1)", measure(sha256sum_cmd(src, 1), args.repeats)),
            ("sha256sum (xargs -P2)", measure(sha256sum_cmd(src, 2), args.repeats)),
            (
                "composefs-csi build, fresh repo",
                measure(lambda: build(src, fresh_dirs[-1]), args.repeats, setup=new_fresh),
            ),
            (
                "composefs-csi build, objects present",
                measure(lambda: build(src, full_repo), args.repeats),
            ),
        ]
    finally:
        for d in fresh_dirs:
            shutil.rmtree(d, ignore_errors=True)

    print()
    print(f"{'contender':40} {'median s':>9} {'MB/s':>8}   runs")
    med: dict[str, float] = {}
    for name, times in rows:
        m = statistics.median(times)
        med[name] = m
        runs = " ".join(f"{t:.2f}" for t in times)
        print(f"{name:40} {m:9.2f} {n_bytes / 1e6 / m:8.0f}   {runs}")
    base1 = med["sha256sum (xargs -P1)"]
    base2 = med["sha256sum (xargs -P2)"]
    fresh = med["composefs-csi build, fresh repo"]
    present = med["composefs-csi build, objects present"]
    print()
    print(f"ratio build(fresh) / sha256sum -P1: {fresh / base1:.2f}  (bar <= {BAR})")
    print(f"ratio build(fresh) / sha256sum -P2: {fresh / base2:.2f}")
    print(f"ratio build(present) / sha256sum -P1: {present / base1:.2f}")
    ok = fresh / base1 <= BAR
    print("PASS" if ok else "FAIL", f"(build fresh vs sha256sum -P1, bar {BAR})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
