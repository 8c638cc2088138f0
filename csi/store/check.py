"""Making a store's state agree with its files: verifying every object's digest (fsck),
quarantining the bad ones, and reconciling the state DB with what is on disk (at start-up
recovery and after repairs)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from csi.image.fsverity import digest_file
from csi.repo import layout
from csi.repo.repository import Progress, Repository

from .db import StateDB
from .reports import FsckReport, RecoveryReport

#: Bad objects by digest: (inode when found bad, -1 if unreadable; the problem).
Bad = dict[bytes, tuple[int, str]]


def find_bad(repo: Repository, report: FsckReport, progress: Progress | None = None) -> Bad:
    """Recompute every object file's digest; the ones that do not match (counted in
    ``report``)."""
    digests = list(repo.iter_objects())
    bad: Bad = {}
    for i, d in enumerate(digests):
        path = repo.object_path(d)
        try:
            st = path.stat()
            actual = digest_file(path)
        except FileNotFoundError:
            continue  # removed meanwhile (GC)
        except OSError as e:
            bad[d] = (-1, f"unreadable: {e.strerror}")
        else:
            report.bytes_checked += st.st_size
            if actual != d:
                bad[d] = (st.st_ino, f"content hashes to {actual.hex()}")
        report.checked += 1
        if progress is not None:
            progress(i + 1, len(digests))
    report.bad = [(layout.object_relpath(d), why) for d, (_, why) in bad.items()]
    return bad


def quarantine(
    repo: Repository, db: StateDB, quarantine_dir: Path, bad: Bad, report: FsckReport
) -> None:
    """Move the ``bad`` files (unless replaced meanwhile) into ``quarantine_dir`` and drop
    their rows, images' too (the caller holds the store's exclusive lock)."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for d, (ino, _why) in bad.items():
        path = repo.object_path(d)
        with contextlib.suppress(FileNotFoundError):
            if ino != -1 and path.stat().st_ino != ino:
                continue  # replaced meanwhile by a verified copy
            dest = quarantine_dir / f"{d.hex()}.{stamp}"
            os.rename(path, dest)
            report.quarantined.append(dest.name)
    with db.tx() as cur:
        for d in bad:
            if db.is_image(d):
                cur.execute("DELETE FROM images WHERE digest = ?", (d,))
                cur.execute("DELETE FROM image_objects WHERE image = ?", (d,))
            db.drop_object(cur, d)
            report.removed_records += 1
    for d in bad:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(repo.image_path(d))


def reconcile(
    repo: Repository, db: StateDB, parse: Callable[[bytes], set[bytes]]
) -> RecoveryReport:
    """Make the state DB agree with the files (the caller holds the exclusive lock): rows
    for objects found on disk, none for those gone, images linked in ``images/`` recorded
    (``parse`` lists their objects; one that does not parse is unlinked), links fixed."""
    rep = RecoveryReport()
    recorded = {bytes(r[0]) for r in db.query("SELECT digest FROM objects")}
    recorded_images = {bytes(r[0]) for r in db.query("SELECT digest FROM images")}
    on_disk = set(repo.iter_objects())
    linked = set(repo.iter_images())
    missing = recorded - on_disk
    unknown = on_disk - recorded
    new_images: dict[bytes, set[bytes]] = {}
    for d in linked & on_disk:
        if d in recorded_images:
            continue
        try:
            new_images[d] = parse(repo.object_path(d).read_bytes())
        except Exception as e:
            rep.problems.append(f"images/{d.hex()} is not a valid image ({e}): unlinked")
            with contextlib.suppress(OSError):
                os.unlink(repo.image_path(d))
    with db.tx() as cur:
        for d in unknown:
            try:
                size = repo.object_path(d).stat().st_size
            except FileNotFoundError:
                continue
            db.record_object(cur, d, size, "object", False)
            rep.recorded_unknown += 1
        for d in missing:
            db.drop_object(cur, d)
            rep.dropped_missing += 1
        for d in recorded_images - on_disk:
            db.drop_image(cur, d)
            rep.images_dropped += 1
        for d, refs in new_images.items():
            db.record_image(cur, d, refs)
            rep.images_recorded += 1
    # Recorded images whose images/<hex> link is gone (or wrong): relink.
    for d in (recorded_images & on_disk) - linked:
        repo.link_image(d)
        rep.links_fixed += 1
    for d in linked - on_disk:
        with contextlib.suppress(OSError):
            os.unlink(repo.image_path(d))
        rep.links_fixed += 1
    for holder, image in db.query("SELECT holder, image FROM leases"):
        if bytes(image) not in on_disk:
            rep.leases_on_missing.append((str(holder), bytes(image)))
    return rep
