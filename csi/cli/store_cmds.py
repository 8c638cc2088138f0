"""Node-store commands: ``pull``, ``gc`` and ``fsck``."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

from csi.cli.progress import Bar


def pull(args: argparse.Namespace) -> int:
    from csi.fetch import pull as fetch_pull
    from csi.fetch.config import BearerAuth
    from csi.fetch.progress import ProgressSnapshot

    lock = threading.Lock()
    last = 0.0
    with Bar(f"pulling {args.ref}") as bar:

        def on_progress(snap: ProgressSnapshot) -> None:
            nonlocal last
            now = time.monotonic()
            with lock:  # called from worker threads after every change: throttle
                if now - last < 0.1 and not snap.finished:
                    return
                last = now
                bar.update_to(snap.bytes_done, snap.bytes_total)
                bar.set_postfix(f"{snap.objects_done}/{snap.objects_total} objects")

        result = fetch_pull(
            args.ref,
            list(args.repository),
            Path(args.store),
            concurrency=args.concurrency,
            processes=args.processes,
            on_progress=on_progress,
            allow_plain_http=args.allow_plain_http,
            auth=BearerAuth(Path(args.bearer_token_file)) if args.bearer_token_file else None,
            ca_bundle=Path(args.ca_bundle) if args.ca_bundle else None,
        )
    print(
        f"{result.objects_total} objects: {result.objects_fetched} fetched, "
        f"{result.objects_present} already present; {result.bytes_downloaded} bytes downloaded "
        f"in {result.duration:.1f} s",
        file=sys.stderr,
    )
    print(f"sha256:{result.image.hex()}")
    return 0


def gc(args: argparse.Namespace) -> int:
    from csi.store import gc_store

    report = gc_store(Path(args.store), dry_run=args.dry_run, target_bytes=args.target_bytes)
    print(report)
    return 0


def fsck(args: argparse.Namespace) -> int:
    from csi.store import fsck_store

    with Bar("checking store") as bar:
        report = fsck_store(Path(args.store), repair=not args.no_repair, progress=bar.update_to)
    print(report)
    return 0 if report.ok else 1
