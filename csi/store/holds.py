"""What keeps images from garbage collection: leases (a volume's, persisted until released)
and pins (a block of code's, gone with it or with its process)."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from csi.repo import layout
from csi.repo.tmpfiles import TempArea, pid_alive

from .db import StateDB
from .writer import is_no_space

log = logging.getLogger(__name__)

#: The store's directory lock: shared (False) or exclusive (True).
StoreLock = Callable[[bool], AbstractContextManager[None]]


class Holds:
    """The leases and pins of one store (its state DB, temp area and directory lock);
    ``changed`` runs after leases change (the store's gauges)."""

    def __init__(
        self,
        root: Path,
        db: StateDB,
        tmp: TempArea,
        lock: StoreLock,
        changed: Callable[[], None],
    ) -> None:
        self._root = root
        self._db = db
        self._tmp = tmp
        self._lock = lock
        self._changed = changed
        #: Pins whose removal failed on a full disk: removed with the next pin or GC.
        self._stale: list[str] = []
        self._stale_mu = threading.Lock()

    def lease(self, holder: str, images: Iterable[bytes]) -> None:
        """Add ``images`` to ``holder``'s lease (idempotent; persisted)."""
        imgs = [layout.check_digest(i) for i in images]
        now = time.time()
        with self._lock(False), self._db.tx() as cur:
            cur.executemany(
                "INSERT OR IGNORE INTO leases VALUES (?, ?, ?)", ((holder, i, now) for i in imgs)
            )
            cur.executemany(
                "UPDATE images SET last_used = ? WHERE digest = ?", ((now, i) for i in imgs)
            )
        self._changed()

    def release(self, holder: str) -> None:
        """Drop every lease of ``holder`` (idempotent)."""
        with self._lock(False), self._db.tx() as cur:
            cur.execute("DELETE FROM leases WHERE holder = ?", (holder,))
        self._changed()

    def leases(self) -> dict[str, set[bytes]]:
        out: dict[str, set[bytes]] = {}
        for holder, image in self._db.query("SELECT holder, image FROM leases"):
            out.setdefault(holder, set()).add(bytes(image))
        return out

    def leased(self) -> set[bytes]:
        """Every leased image."""
        return {bytes(r[0]) for r in self._db.query("SELECT image FROM leases")}

    @contextlib.contextmanager
    def pin(self, images: Iterable[bytes]) -> Iterator[None]:
        """Protect ``images`` (and their objects) from GC while the block runs.

        Visible to GC in other processes; pins of dead processes are ignored. Pin an image
        before checking whether it is present, so GC cannot remove it in between. A pin
        belongs to this process's owner id in the store's temp area (not to its pid, which
        a containerised process shares with every other pid 1).
        """
        imgs = {layout.check_digest(i) for i in images}
        token = secrets.token_hex(8)
        owner = self._tmp.owner()
        with self._lock(False), self._db.tx() as cur:
            stale = self._drop_stale(cur)
            cur.execute("INSERT INTO pin_owners VALUES (?, ?)", (token, owner))
            # The pid column stays for older versions sharing the store during an upgrade.
            cur.executemany(
                "INSERT OR IGNORE INTO pins VALUES (?, ?, ?)",
                ((token, os.getpid(), i) for i in imgs),
            )
        self._forget_stale(stale)
        try:
            yield
        finally:
            try:
                with self._db.tx() as cur:
                    _delete_pins(cur, [token])
            except sqlite3.OperationalError as e:
                # The disk is full (SQLite needs room even to delete): the block's own error,
                # most likely "no space" too, must not be replaced by this one. The pin stays
                # until the next pin or GC of this process removes it.
                if not is_no_space(e):
                    raise
                log.warning("store %s: full; unpinning %d images later", self._root, len(imgs))
                with self._stale_mu:
                    self._stale.append(token)

    def _drop_stale(self, cur: sqlite3.Cursor) -> list[str]:
        """Delete the stale pins in transaction ``cur``; forget them once it committed."""
        with self._stale_mu:
            stale = list(self._stale)
        if stale:
            _delete_pins(cur, stale)
        return stale

    def _forget_stale(self, done: list[str]) -> None:
        if done:
            with self._stale_mu:
                self._stale = [t for t in self._stale if t not in done]

    def touch(self, image: bytes) -> None:
        """Mark ``image`` as used now (LRU order of GC)."""
        with self._db.tx() as cur:
            cur.execute(
                "UPDATE images SET last_used = ? WHERE digest = ?",
                (time.time(), layout.check_digest(image)),
            )

    def dead_pins(self) -> list[str]:
        """Tokens of pins whose process is gone: by owner id, or by pid for the pins of an
        older version (which recorded only that)."""
        rows = self._db.query(
            "SELECT DISTINCT pins.token, pins.pid, pin_owners.owner FROM pins "
            "LEFT JOIN pin_owners ON pin_owners.token = pins.token"
        )
        alive: dict[str, bool] = {}
        dead: list[str] = []
        for token, pid, owner in rows:
            key = str(owner) if owner is not None else f"pid:{pid}"
            if key not in alive:
                alive[key] = (
                    self._tmp.owner_alive(str(owner)) if owner is not None else pid_alive(pid)
                )
            if not alive[key]:
                dead.append(str(token))
        orphans = self._db.query(
            "SELECT token FROM pin_owners WHERE token NOT IN (SELECT token FROM pins)"
        )
        return dead + [str(r[0]) for r in orphans]

    def live_pins(self) -> set[bytes]:
        """Every image pinned by a living process (the pins of dead ones, and this process's
        stale ones, are deleted first)."""
        dead = self.dead_pins()
        if dead or self._stale:
            with self._db.tx() as cur:
                _delete_pins(cur, dead)
                stale = self._drop_stale(cur)
            self._forget_stale(stale)
        return {bytes(r[0]) for r in self._db.query("SELECT image FROM pins")}


def _delete_pins(cur: sqlite3.Cursor, tokens: list[str]) -> None:
    cur.executemany("DELETE FROM pins WHERE token = ?", ((t,) for t in tokens))
    cur.executemany("DELETE FROM pin_owners WHERE token = ?", ((t,) for t in tokens))
