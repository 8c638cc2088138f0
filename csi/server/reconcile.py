"""Start-up reconciliation of the node plugin: make the node agree with its record.

After a restart (or a kill -9) every recorded target is either finished (published and healthy,
or repaired) or undone, every volume either holds its lease again or is dropped, and views and
leases nobody records are released.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

from . import metrics as m
from .dataplane import DataPlaneUnavailable
from .errors import CsiError
from .volumes import LEASE_PREFIX, VIEW_PREFIX, VolumeManager, lease_holder, view_holder

log = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    healthy: int = 0
    repaired: list[str] = field(default_factory=list)
    cleaned: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    volumes_dropped: list[str] = field(default_factory=list)
    orphan_views: int = 0
    orphan_leases: int = 0


def reconcile(manager: VolumeManager) -> ReconcileReport:
    """Make the node agree with ``manager``'s record (run at start, before serving)."""
    rep = ReconcileReport()
    for rec in manager.state.targets():
        vol = manager.state.volume(rec.volume_id)
        if rec.state != "published" or vol is None:
            try:
                manager._undo_target(rec)
                rep.cleaned.append(rec.target_path)
                m.MOUNTS_CLEANED.inc()
            except OSError as e:
                rep.failed.append(f"{rec.target_path}: {e}")
            continue
        if manager.target_problem(rec.target_path, device=manager.dataplane_device()) is None:
            rep.healthy += 1
            continue
        try:
            manager._repair(rec, vol)
            rep.repaired.append(rec.target_path)
        except (OSError, CsiError, DataPlaneUnavailable) as e:
            rep.failed.append(f"{rec.target_path}: {e}")
            log.error("cannot repair volume %s at %s: %s", rec.volume_id, rec.target_path, e)
    for vol in manager.state.volumes():
        if vol.state != "ready" or (vol.ephemeral and not manager.state.targets(vol.volume_id)):
            manager._drop_volume(vol.volume_id)
            rep.volumes_dropped.append(vol.volume_id)
        else:
            manager.store.lease(lease_holder(vol.volume_id), vol.images)
    _drop_orphans(manager, rep)
    manager._update_gauges()
    return rep


def _drop_orphans(manager: VolumeManager, rep: ReconcileReport) -> None:
    targets = {view_holder(t.target_path): t for t in manager.state.targets()}
    try:
        holders = manager.dataplane.holders()
    except DataPlaneUnavailable as e:
        log.warning("cannot list data plane views: %s", e)
        holders = {}
    for key, hs in holders.items():
        for h in hs:
            rec = targets.get(h)
            if h.startswith(VIEW_PREFIX) and (rec is None or rec.view_key != key):
                with contextlib.suppress(DataPlaneUnavailable):
                    manager.dataplane.remove_view(key, h)
                    rep.orphan_views += 1
    volumes = {lease_holder(v.volume_id) for v in manager.state.volumes()}
    for holder in manager.store.leases():
        if holder.startswith(LEASE_PREFIX) and holder not in volumes:
            manager.store.release(holder)
            rep.orphan_leases += 1
