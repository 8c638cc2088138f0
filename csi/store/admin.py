"""Plain functions behind ``composefs-csi gc`` and ``composefs-csi fsck`` (the CLI is elsewhere)."""

from __future__ import annotations

from pathlib import Path

from csi.repo.repository import Progress

from .reports import FsckReport, GcReport
from .store import Store


def gc_store(
    root: Path,
    *,
    dry_run: bool = False,
    target_bytes: int | None = None,
    size_cap: int | None = None,
) -> GcReport:
    """Open the store at ``root``, collect garbage, close. ``str(report)`` is the summary."""
    with Store(Path(root), size_cap=size_cap) as store:
        return store.gc(target_bytes=target_bytes, dry_run=dry_run)


def fsck_store(root: Path, *, repair: bool = True, progress: Progress | None = None) -> FsckReport:
    """Open the store at ``root``, verify every file, quarantine bad ones (``repair``)."""
    with Store(Path(root)) as store:
        return store.fsck(repair=repair, progress=progress)
