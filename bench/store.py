"""Store insertion micro-benchmark: objects/s for many small inserts through ``Store.ensure``.

    python -m bench.store                          # 20k x 4 KiB at concurrency 1, 8, 16
    python -m bench.store --objects 2000 --runs 1  # quick

Each run fills a fresh store in ``--workdir`` (default: a temp dir under /var/tmp, i.e. on the
disk, not a tmpfs) with distinct objects, from ``C`` threads calling ``ensure`` with a ``fill``
that writes the bytes, as a fetch worker does (without the network). ``--no-fsync`` measures the
store without durability, to show what the flush costs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from csi.image.fsverity import digest_bytes
from csi.store import ObjectWriter, Store


def make_blobs(n: int, size: int, seed: int) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(n):
        data = (seed.to_bytes(4, "little") + i.to_bytes(8, "little")) * (size // 12 + 1)
        data = data[:size]
        out.append((digest_bytes(data), data))
    return out


def run(root: Path, blobs: list[tuple[bytes, bytes]], concurrency: int, fsync: bool) -> float:
    """Seconds to insert every blob with ``concurrency`` threads (store opened beforehand)."""
    with Store(root, fsync=fsync) as store:
        nxt = 0
        mu = threading.Lock()
        errors: list[BaseException] = []

        def worker() -> None:
            nonlocal nxt
            while True:
                with mu:
                    i = nxt
                    nxt += 1
                if i >= len(blobs):
                    return
                d, data = blobs[i]

                def fill(w: ObjectWriter, data: bytes = data) -> None:
                    w.write(data)

                try:
                    store.ensure(d, fill, size_hint=len(data))
                except BaseException as e:
                    errors.append(e)
                    return

        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        dt = time.perf_counter() - t0
        if errors:
            raise errors[0]
        assert store.usage().files == len(blobs)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=20_000)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-fsync", action="store_true", help="store opened with fsync=False")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-store-", dir=args.workdir) as tmp:
        work = Path(tmp)
        for c in args.concurrency:
            rates = []
            for r in range(args.runs):
                blobs = make_blobs(args.objects, args.size, seed=1000 * c + r)
                os.sync()
                dt = run(work / f"s{c}-{r}", blobs, c, not args.no_fsync)
                rates.append(args.objects / dt)
                shutil.rmtree(work / f"s{c}-{r}")
            print(
                f"{args.objects} x {args.size} B, concurrency {c:2d}"
                f"{' (no fsync)' if args.no_fsync else ''}: "
                f"{statistics.median(rates):7.0f} objects/s "
                f"(runs: {', '.join(f'{x:.0f}' for x in rates)})",
                flush=True,
            )


if __name__ == "__main__":
    main()
