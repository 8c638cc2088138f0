"""Garbage collection's reads and removals: the state it plans from (:mod:`.gcplan`), then
the files and rows of what the plan removes (the caller holds the store's exclusive lock)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Set

from csi.repo import layout
from csi.repo.repository import Repository

from .db import StateDB
from .gcplan import plan_gc
from .reports import GcReport


def collect(
    repo: Repository,
    db: StateDB,
    protected: Set[bytes],
    target_for: Callable[[int], int | None],
    dry_run: bool,
) -> GcReport:
    """Plan (never removing a ``protected`` image or an object a remaining image
    references; ``target_for(bytes stored)``: bytes to free, None for everything
    unprotected) and, unless ``dry_run``, remove: files first (that frees space even when the
    state DB cannot be written), then rows."""
    q = db.query
    sizes = {bytes(d): int(s) for d, s in q("SELECT digest, size FROM objects")}
    images = {bytes(d): float(t) for d, t in q("SELECT digest, last_used FROM images")}
    refs: dict[bytes, set[bytes]] = {}
    for img, obj in q("SELECT image, object FROM image_objects"):
        refs.setdefault(bytes(img), set()).add(bytes(obj))
    before = sum(sizes.values())
    target = target_for(before)
    plan = plan_gc(sizes=sizes, images=images, refs=refs, protected=protected, target=target)
    report = GcReport(
        dry_run=dry_run,
        target_bytes=target,
        bytes_before=before,
        removed_images=list(plan.images),
        removed_objects=len(plan.objects),
        freed_bytes=plan.freed,
        protected_images=len(protected & images.keys()),
    )
    if dry_run:
        return report
    removed_imgs = set(plan.images)
    for img in plan.images:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(repo.image_path(img))
    for name, target_digest in list(repo.iter_refs()):
        if target_digest in removed_imgs:
            with contextlib.suppress(OSError):
                repo.remove_ref(name)
    for d in plan.objects:
        try:
            os.unlink(repo.object_path(d))
        except FileNotFoundError:
            pass
        except OSError as e:
            report.errors.append(f"removing {layout.object_relpath(d)}: {e.strerror}")
    with db.tx() as cur:
        for img in plan.images:
            db.drop_image(cur, img)
        for d in plan.objects:
            db.drop_object(cur, d)
    return report
