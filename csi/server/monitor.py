"""The node plugin's mount monitor: published volumes repaired within seconds of a data-plane
restart, without waiting for kubelet.

When the data plane process dies (SIGKILL, OOM, an update), its FUSE mount dies with it: every
bind of one of its views at a target answers ENOTCONN. The new data plane mounts afresh (a new
device), and every target must get a view of *that* mount. Every ``interval`` seconds the
monitor reads the mount table once and compares each published target's top mount with the
data plane's current mount (a device number: no request reaches FUSE); a target that does not
match is repaired (:meth:`VolumeManager.repair_target`: a new view mounted over it). Every
``deep_every``-th round it also stats each target, for failures a device number cannot show.

:meth:`MountMonitor.check` is a liveness check for Identity.Probe: it fails while the data plane
is up but some target has stayed broken for longer than ``grace`` seconds (the plugin cannot
repair it, and restarting the plugin is the next thing to try).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from . import mounts
from .volumes import VolumeManager

log = logging.getLogger(__name__)

#: A target that stays broken is logged again every this many rounds, not at every one.
LOG_EVERY = 30


class MountMonitor:
    def __init__(
        self,
        manager: VolumeManager,
        *,
        interval: float = 2.0,
        deep_every: int = 15,
        grace: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.manager = manager
        self.interval = interval
        self.deep_every = max(1, deep_every)
        self.grace = grace
        self._clock = clock
        self._rounds = 0
        self._broken_since: dict[str, float] = {}
        self._problems: dict[str, str] = {}
        self._mu = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mount-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
            except Exception:
                log.exception("mount monitor round failed")

    def run_once(self) -> list[str]:
        """One round: repair what needs it. Returns the targets repaired."""
        self._rounds += 1
        deep = self._rounds % self.deep_every == 0
        table = mounts.mount_table()
        device = self.manager.dataplane_device(table)
        mountpoint = self.manager.dataplane_mountpoint
        if device is None or mounts.probe(mountpoint) != 0:
            return []  # nothing to repair from until the data plane is back
        repaired: list[str] = []
        now = self._clock()
        seen: set[str] = set()
        for target in self.manager.published_targets():
            seen.add(target)
            problem = self.manager.target_problem(target, table, device, deep=deep)
            if problem is None or self.manager.covered_by_foreign(target, table):
                # Healthy, or covered by someone else's mount: nothing this plugin may change.
                self._healthy(target)
                continue
            with self._mu:
                first = target not in self._broken_since
            if first:
                log.warning("published volume at %s: %s; repairing it", target, problem)
            try:
                if self.manager.repair_target(target):
                    repaired.append(target)
                    self._healthy(target)
                    continue
            except Exception as e:
                problem = f"{problem}; repair failed: {e}"
                if first or self._rounds % LOG_EVERY == 0:  # not every round
                    log.error("cannot repair %s: %s", target, e)
            with self._mu:
                self._broken_since.setdefault(target, now)
                self._problems[target] = problem
        with self._mu:
            for gone in set(self._broken_since) - seen:  # unpublished meanwhile
                self._broken_since.pop(gone, None)
                self._problems.pop(gone, None)
        return repaired

    def _healthy(self, target: str) -> None:
        with self._mu:
            self._broken_since.pop(target, None)
            self._problems.pop(target, None)

    def check(self) -> str | None:
        """Probe check: None while every target is healthy or being repaired; the reason when
        some target has stayed broken past the grace period with the data plane up."""
        # Looked at now, not as of the last round: a data plane that is back is seen at once.
        # (Also fails when the data plane answers on its socket: this process cannot use it.)
        mountpoint = self.manager.dataplane_mountpoint
        if self.manager.dataplane_device() is None or mounts.probe(mountpoint) != 0:
            return f"the data plane's mount at {mountpoint} is not serving"
        now = self._clock()
        with self._mu:
            stuck = [t for t, since in self._broken_since.items() if now - since > self.grace]
            if not stuck:
                return None
            first = stuck[0]
            return (
                f"{len(stuck)} published volume(s) stayed broken for more than "
                f"{self.grace:.0f} s; first: {first}: {self._problems.get(first, '?')}"
            )
