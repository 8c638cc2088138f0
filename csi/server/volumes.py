"""The node plugin's work, as plain methods the gRPC handlers call: stage, publish, unpublish,
unstage, stats, and the health and repair of published mounts (start-up reconciliation is in
:mod:`csi.server.reconcile`, the periodic check in :mod:`csi.server.monitor`).

Holders: the store lease of a volume is held by ``csi-volume:<volume id>`` (staged persistent
volumes, published ephemeral volumes); the data-plane view mounted at a target is held by
``csi-target:<target path>``. Every change is recorded in
:class:`~csi.server.state.NodeState` before it is made, so reconciliation can finish or undo a
publish or unpublish that a killed process left half done: after a restart every volume is
published or cleanly absent.

Locks: one per target path and one per volume id, taken without waiting (a concurrent call on
the same key gets ABORTED); the per-image fetch jobs are shared across volumes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from csi.fetch.refs import parse_digest
from csi.store import Store

from . import attributes as a
from . import metrics as m
from . import mounts, volumeid
from .dataplane import DataPlane, DataPlaneUnavailable, View
from .errors import CsiError, already_exists, invalid, not_found, precondition
from .fetcher import Fetcher, FetchJobs
from .imageinfo import ImageSize, SizeCache
from .locks import KeyedLocks
from .state import NodeState, TargetRecord, VolumeRecord
from .targets import Places
from .volumeid import PinnedSpec

log = logging.getLogger(__name__)

LEASE_PREFIX = "csi-volume:"
VIEW_PREFIX = "csi-target:"


def lease_holder(volume_id: str) -> str:
    return LEASE_PREFIX + volume_id


def view_holder(target: str) -> str:
    return VIEW_PREFIX + target


@dataclass(frozen=True, slots=True)
class VolumeStats:
    size: ImageSize
    abnormal: bool
    message: str


class VolumeManager:
    def __init__(
        self,
        *,
        store: Store,
        dataplane: DataPlane,
        fetcher: Fetcher,
        state: NodeState,
        repositories: Sequence[str],
        default_repository: str,
        rpc_wait: float,
        places: Places,
        mount_source: str,
        dataplane_mountpoint: str,
        max_fetch_jobs: int = 8,
    ) -> None:
        """``places``: where targets and staging paths may be; ``mount_source``: the source of
        the data plane's mount (:func:`csi.fuse.config.mount_source`): the only mounts this
        manager ever removes are those with it; ``dataplane_mountpoint``: where that mount is
        (as this process sees it)."""
        self.store = store
        self.places = places
        self.mount_source = mount_source
        self.dataplane_mountpoint = os.path.realpath(dataplane_mountpoint)
        self.dataplane = dataplane
        self.fetcher = fetcher
        self.state = state
        self.repositories = frozenset(repositories)
        self.default_repository = default_repository
        self.rpc_wait = rpc_wait
        self.jobs = FetchJobs(fetcher, is_complete=self._is_complete, max_jobs=max_fetch_jobs)
        self.sizes = SizeCache()
        self.target_locks = KeyedLocks("target path")
        self.volume_locks = KeyedLocks("volume")
        self._complete: dict[bytes, int] = {}
        self._complete_mu = threading.Lock()
        self._update_gauges()

    def close(self) -> None:
        self.jobs.close()

    def _update_gauges(self) -> None:
        m.VOLUMES_PUBLISHED.set(sum(1 for t in self.state.targets() if t.state == "published"))
        m.VOLUMES_STAGED.set(
            sum(1 for v in self.state.volumes() if not v.ephemeral and v.state == "ready")
        )

    # -- images ----------------------------------------------------------------------------

    def _is_complete(self, image: bytes, lazy: bool) -> bool:
        """The image is in the store and (eager) so is every object it references.

        A complete eager image is remembered with the inode of its file, so a later check is
        one stat; an image collected and fetched again (maybe lazily) has a new inode."""
        if not self.store.has_image(image):
            return False
        if lazy:
            return True
        try:
            ino = os.stat(self.store.image_path(image)).st_ino
        except OSError:
            return False
        with self._complete_mu:
            if self._complete.get(image) == ino:
                return True
        if self.store.missing_objects(image):
            return False
        with self._complete_mu:
            self._complete[image] = ino
        return True

    def _repository(self, name: str | None) -> str:
        repo = name or self.default_repository
        if repo not in self.repositories:
            raise invalid(
                f"repository {repo[:128]!r} is not configured on this node "
                f"(configured: {', '.join(sorted(self.repositories))})"
            )
        return repo

    def _resolve(self, repository: str, ref: str) -> bytes:
        digest = parse_digest(ref)
        if digest is not None:
            return digest
        # An unreachable repository: the fetcher answers with this node's last resolution,
        # within the repository's limits (csi.fetch.noderefs).
        return self.fetcher.resolve(repository, ref)

    def spec_for(self, volume_id: str, context: Mapping[str, str]) -> PinnedSpec:
        """What ``volume_id`` serves: from the id itself (provisioned volumes) or from the
        ``volume_context`` attributes (inline volumes, static PVs), refs resolved."""
        if volumeid.is_ours(volume_id):
            try:
                spec = volumeid.decode(volume_id, context)
            except ValueError as e:
                raise not_found(f"volume {volume_id[:200]!r}: {e}") from None
            if spec.repository not in self.repositories:
                raise precondition(
                    f"volume {volume_id!r} uses repository {spec.repository!r}, which is not "
                    "configured on this node"
                )
            return spec
        vspec = a.parse_volume_attributes(context)
        repo = self._repository(vspec.repository)
        images = tuple(self._resolve(repo, r) for r in vspec.refs)
        return PinnedSpec(repository=repo, images=images, lazy=vspec.lazy)

    def _fetch(self, spec: PinnedSpec) -> bool:
        """Wait for the images (ABORTED if it takes longer than rpc_wait). True if warm."""
        return self.jobs.ensure(spec.repository, spec.images, lazy=spec.lazy, wait=self.rpc_wait)

    # -- stage / unstage -------------------------------------------------------------------

    def stage(self, volume_id: str, staging_path: str, context: Mapping[str, str]) -> None:
        staging = self.places.staging(staging_path)
        with self.volume_locks.hold(volume_id):
            vol = self.state.volume(volume_id)
            if vol is not None and vol.state == "ready":
                if vol.ephemeral:
                    raise precondition(f"volume {volume_id!r} is an ephemeral volume")
                if vol.staging_path != staging:
                    raise precondition(
                        f"volume {volume_id!r} is already staged at {vol.staging_path!r}"
                    )
                return
            spec = self.spec_for(volume_id, context)
            t0 = time.monotonic()
            warm = self._acquire(
                volume_id, spec, kind="persistent", staging_path=staging, undo=self._drop_volume
            )
            m.PUBLISH_DURATION.labels(spec_mode(spec), "warm" if warm else "cold").observe(
                time.monotonic() - t0
            )
            self._update_gauges()

    def unstage(self, volume_id: str, staging_path: str) -> None:
        staging = self.places.staging(staging_path)
        with self.volume_locks.hold(volume_id):
            vol = self.state.volume(volume_id)
            if vol is None or vol.ephemeral or vol.staging_path != staging:
                return  # not staged there: nothing to do (idempotent)
            busy = [t.target_path for t in self.state.targets(volume_id)]
            if busy:
                raise precondition(
                    f"volume {volume_id!r} is still published at {', '.join(busy[:5])}"
                )
            self.state.set_volume_state(volume_id, "unstaging")
            self._drop_volume(volume_id)
            self._update_gauges()

    def _drop_volume(self, volume_id: str) -> None:
        self.store.release(lease_holder(volume_id))
        self.state.delete_volume(volume_id)

    # -- publish / unpublish ---------------------------------------------------------------

    def publish(
        self,
        volume_id: str,
        target_path: str,
        staging_path: str,
        context: Mapping[str, str],
    ) -> None:
        target = self.places.target(target_path)
        ephemeral = a.pod_info(context).ephemeral or (
            not staging_path and not volumeid.is_ours(volume_id)
        )
        with self.target_locks.hold(target), self.volume_locks.hold(volume_id):
            existing = self.state.target(target)
            if existing is not None:
                if existing.volume_id != volume_id:
                    raise already_exists(
                        f"target {target!r} already has volume {existing.volume_id!r} published"
                    )
                if existing.state == "published":
                    self._ensure_healthy(existing)
                    return
                self._undo_target(existing)  # a failed earlier attempt: start over
            t0 = time.monotonic()
            warm = True
            if ephemeral:
                vol = self.state.volume(volume_id)
                if vol is not None and vol.state == "ready":
                    spec = PinnedSpec(vol.repository, vol.images, vol.lazy)
                else:
                    spec = self.spec_for(volume_id, context)
                    warm = self._acquire_ephemeral(volume_id, spec)
            else:
                if not staging_path:
                    raise precondition(
                        "staging_target_path missing: this plugin stages persistent volumes "
                        "(NodeStageVolume) before publishing them"
                    )
                staging = self.places.staging(staging_path)
                vol = self.state.volume(volume_id)
                if vol is None or vol.state != "ready" or vol.staging_path != staging:
                    raise precondition(f"volume {volume_id!r} is not staged at {staging!r}")
                spec = PinnedSpec(vol.repository, vol.images, vol.lazy)
            try:
                self._mount_target(volume_id, target, spec)
            except BaseException:
                if ephemeral:
                    self._maybe_drop_ephemeral(volume_id)
                raise
            m.PUBLISH_DURATION.labels(spec_mode(spec), "warm" if warm else "cold").observe(
                time.monotonic() - t0
            )
            self._update_gauges()

    def _acquire_ephemeral(self, volume_id: str, spec: PinnedSpec) -> bool:
        return self._acquire(
            volume_id,
            spec,
            kind="ephemeral",
            staging_path=None,
            undo=self._maybe_drop_ephemeral,
        )

    def _acquire(
        self,
        volume_id: str,
        spec: PinnedSpec,
        *,
        kind: str,
        staging_path: str | None,
        undo: Callable[[str], None],
    ) -> bool:
        """Record the volume, lease its images and fetch them; ``undo`` on failure.

        Returns True when nothing had to be fetched (warm)."""
        self.state.put_volume(
            volume_id,
            kind=kind,
            repository=spec.repository,
            images=spec.images,
            lazy=spec.lazy,
            staging_path=staging_path,
            state="staging",
        )
        try:
            self.store.lease(lease_holder(volume_id), spec.images)
            warm = self._fetch(spec)
        except BaseException:
            undo(volume_id)
            raise
        self.state.set_volume_state(volume_id, "ready")
        return warm

    def _maybe_drop_ephemeral(self, volume_id: str) -> None:
        vol = self.state.volume(volume_id)
        if vol is not None and vol.ephemeral and not self.state.targets(volume_id):
            self._drop_volume(volume_id)

    def _add_view(self, spec: PinnedSpec, target: str) -> View:
        try:
            return self.dataplane.add_view(
                spec.images, view_holder(target), lazy=spec.lazy, repository=spec.repository
            )
        except DataPlaneUnavailable as e:
            raise CsiError(grpc.StatusCode.UNAVAILABLE, str(e)) from e

    def _mount_target(self, volume_id: str, target: str, spec: PinnedSpec) -> None:
        # Recorded before anything is made: the directory is ours if it is not there yet.
        self.state.put_target(target, volume_id, "publishing", made_dir=not os.path.lexists(target))
        try:
            view = self._add_view(spec, target)
            self.state.set_target_view(target, view.key, str(view.path))
            self._clear_target(target)
            self._bind(view.path, target)
            self.state.set_target_state(target, "published")
        except BaseException:
            rec = self.state.target(target)
            if rec is not None:
                self._undo_target(rec)
            raise

    def _bind(self, view_path: Path, target: str) -> None:
        """Bind the view at ``target`` (made if missing), reached without following links.

        The data plane's mount is made private here first: a bind of a shared mount would
        join its peer group, so that a mount later made over one target (a repair) would
        appear over every other target of the same view, and its unmount (one pod's
        unpublish) would take it from all of them. Bound from a private mount into kubelet's
        shared directory, each target is a propagation tree of its own: its copies on the
        host and in HostToContainer pods, nothing else."""
        mounts.make_private(self.dataplane_mountpoint)
        opened = self.places.open_target(target, create=True)
        try:
            mounts.bind_mount_ro(view_path, opened)
        finally:
            opened.close()

    def _refuse_foreign(self, target: str) -> None:
        """FAILED_PRECONDITION if someone else's mount is at ``target``: never touched."""
        foreign = mounts.foreign_mounts(target, self.mount_source)
        if foreign:
            m = foreign[-1]
            raise precondition(
                f"target {target} has a mount that is not this driver's "
                f"({m.fstype[:40]} from {m.source[:80]!r}): refusing to mount over it"
            )

    def covered_by_foreign(self, target: str, table: list[mounts.MountInfo]) -> bool:
        """The top mount at ``target`` is someone else's (nothing this plugin may repair)."""
        stack = mounts.mounts_at(target, table)
        return bool(stack) and not mounts.is_ours(stack[-1], self.mount_source)

    def _clear_target(self, target: str) -> None:
        """Unmount what mounts of ours a lost record left at ``target`` (dead ones included).
        Anyone else's mount there is left alone, and the publish refused."""
        self._refuse_foreign(target)
        mounts.unmount_ours(target, self.mount_source)

    def _undo_target(self, rec: TargetRecord) -> None:
        """Unmount our mounts, remove the directory if we made it, drop the view hold,
        forget the target."""
        self.state.set_target_state(rec.target_path, "unpublishing")
        mounts.unmount_ours(rec.target_path, self.mount_source)
        if rec.made_dir and not mounts.mounts_at(rec.target_path):
            with contextlib.suppress(OSError, CsiError):
                self.places.remove_dir(rec.target_path)
        if rec.view_key is not None:
            try:
                self.dataplane.remove_view(rec.view_key, view_holder(rec.target_path))
            except DataPlaneUnavailable as e:
                # The hold is dropped at the next reconciliation (orphan holders).
                log.warning("could not release view %s: %s", rec.view_key, e)
        self.state.delete_target(rec.target_path)

    # -- health and repair -----------------------------------------------------------------

    def dataplane_device(self, table: list[mounts.MountInfo] | None = None) -> str | None:
        """The device (``major:minor``) of the data plane's FUSE mount as this process sees
        it, or None if it is not mounted here (not running, or gone)."""
        stack = mounts.mounts_at(self.dataplane_mountpoint, table)
        if stack and mounts.is_ours(stack[-1], self.mount_source):
            return stack[-1].device
        return None

    def target_problem(
        self,
        target: str,
        table: list[mounts.MountInfo] | None = None,
        device: str | None = None,
        *,
        deep: bool = True,
    ) -> str | None:
        """None if ``target`` shows a live view: the top mount there is ours and comes from
        the data plane's current mount (``device``, if known); with ``deep``, it also answers
        stat and statfs. Otherwise what is wrong, in words."""
        stack = mounts.mounts_at(target, table)
        if not stack:
            return "not mounted"
        top = stack[-1]
        if not mounts.is_ours(top, self.mount_source):
            return f"covered by a mount that is not this driver's ({top.fstype[:40]})"
        if device is not None and top.device != device:
            return f"mounted from a previous data plane (device {top.device}, now {device})"
        if deep:
            err = mounts.probe(target)
            if err:
                return f"broken: {os.strerror(err)} ({errno.errorcode.get(err)})"
        return None

    def _ensure_healthy(self, rec: TargetRecord) -> None:
        """A published target asked again: repair it if its mount is gone or broken."""
        if self.target_problem(rec.target_path, device=self.dataplane_device()) is None:
            return
        vol = self.state.volume(rec.volume_id)
        if vol is None:
            raise not_found(f"volume {rec.volume_id!r} has no record on this node")
        self._repair(rec, vol)

    def repair_target(self, target: str) -> bool:
        """Repair the published ``target`` if it is not healthy (for the mount monitor, which
        runs beside kubelet's calls: a target busy with one of those is left for the next
        round). True if it was repaired."""
        try:
            with self.target_locks.hold(target):
                rec = self.state.target(target)
                if rec is None or rec.state != "published":
                    return False
                if self.target_problem(target, device=self.dataplane_device()) is None:
                    return False
                vol = self.state.volume(rec.volume_id)
                if vol is None:
                    return False
                self._repair(rec, vol)
                return True
        except CsiError as e:
            if e.code == grpc.StatusCode.ABORTED:
                return False  # kubelet is working on it right now
            raise

    def published_targets(self) -> list[str]:
        return [t.target_path for t in self.state.targets() if t.state == "published"]

    def _repair(self, rec: TargetRecord, vol: VolumeRecord) -> None:
        """Mount a live view of the volume *over* whatever of ours is at the target (a dead
        mount of a previous data plane stays beneath, covered, until the unpublish): pods
        that see the target with HostToContainer propagation get the new mount on top of
        theirs, which an unmount followed by a new mount would not give them."""
        spec = PinnedSpec(vol.repository, vol.images, vol.lazy)
        view = self._add_view(spec, rec.target_path)
        err = mounts.probe(view.path)
        if err:
            raise CsiError(
                grpc.StatusCode.UNAVAILABLE,
                f"the data plane's view {view.path} does not answer ({os.strerror(err)}): "
                f"cannot repair {rec.target_path} from it",
            )
        self.state.set_target_view(rec.target_path, view.key, str(view.path))
        self._refuse_foreign(rec.target_path)
        self._bind(view.path, rec.target_path)
        m.MOUNTS_REPAIRED.inc()
        log.info("repaired the mount of volume %s at %s", rec.volume_id, rec.target_path)

    def unpublish(self, volume_id: str, target_path: str) -> None:
        target = self.places.target(target_path)
        with self.target_locks.hold(target), self.volume_locks.hold(volume_id):
            rec = self.state.target(target)
            if rec is None:
                self._unpublish_unknown(target)
                return
            if rec.volume_id != volume_id:
                raise not_found(
                    f"volume {volume_id!r} is not published at {target!r} "
                    f"(volume {rec.volume_id!r} is)"
                )
            self._undo_target(rec)
            self._maybe_drop_ephemeral(volume_id)
            self._update_gauges()

    def _unpublish_unknown(self, target: str) -> None:
        """No record: unmount what mounts of ours are there (a record lost with a state
        file); nothing else. The directory stays: nothing proves this plugin made it (kubelet
        removes it after a successful unpublish)."""
        n = mounts.unmount_ours(target, self.mount_source)
        if n:
            log.info("unpublish of %s: removed %d mount(s) of ours it had no record of", target, n)
        foreign = mounts.foreign_mounts(target, self.mount_source)
        if foreign:
            log.warning(
                "unpublish of %s: left %d mount(s) that are not this driver's (%s)",
                target,
                len(foreign),
                foreign[-1].fstype[:40],
            )

    # -- stats -----------------------------------------------------------------------------

    def stats(self, volume_id: str, volume_path: str) -> VolumeStats:
        path = self.places.volume_path(volume_path)
        vol = self.state.volume(volume_id)
        rec = self.state.target(path)
        is_target = rec is not None and rec.volume_id == volume_id and rec.state == "published"
        is_staging = vol is not None and vol.staging_path == path and vol.state == "ready"
        if vol is None or not (is_target or is_staging):
            raise not_found(f"volume {volume_id!r} is not published or staged at {path!r}")
        problems: list[str] = []
        images = [(d, self.store.image_path(d)) for d in vol.images]
        size = ImageSize(0, 0)
        missing_images = [d for d in vol.images if not self.store.has_image(d)]
        if missing_images:
            problems.append(f"{len(missing_images)} image(s) missing from the store")
        else:
            try:
                size = self.sizes.total(images)
            except (OSError, ValueError) as e:
                problems.append(f"image unreadable: {e}")
            if not vol.lazy:
                missing = sum(len(self.store.missing_objects(d)) for d in vol.images)
                if missing:
                    problems.append(f"{missing} object(s) missing from the store")
        if is_target:
            err = mounts.probe(path)
            if err:
                problems.append(f"mount broken: {os.strerror(err)} ({errno.errorcode.get(err)})")
            elif not mounts.mounts_at(path):
                problems.append("not mounted")
        return VolumeStats(size, bool(problems), "; ".join(problems) or "ok")


def spec_mode(spec: PinnedSpec) -> str:
    return "lazy" if spec.lazy else "eager"
