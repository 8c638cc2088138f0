"""What the store notes of refs: what a name resolved to in a repository, when a repository
last confirmed it, and the HTTP validators of that answer (local notes, not GC roots)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from csi.repo import layout

from .db import StateDB
from .holds import StoreLock


@dataclass(frozen=True, slots=True)
class RefRecord:
    """A ref as the store last saw it resolved (:meth:`csi.store.Store.ref_record`)."""

    digest: bytes
    #: When a repository last confirmed it (seconds since the epoch).
    checked: float
    etag: str | None = None
    last_modified: str | None = None
    #: The mirror that gave the validators (its base URL or path).
    source: str | None = None


class RefNotes:
    """The ``refs`` table of one store."""

    def __init__(self, db: StateDB, lock: StoreLock) -> None:
        self._db = db
        self._lock = lock

    def set(
        self,
        repository: str,
        name: str,
        digest: bytes,
        *,
        etag: str | None = None,
        last_modified: str | None = None,
        source: str | None = None,
    ) -> None:
        """Record what ``name`` resolved to in ``repository``, confirmed now; with the HTTP
        validators of the answer and the mirror (``source``) that gave them, for a
        conditional request next time."""
        layout.validate_ref_name(repository)
        layout.validate_ref_name(name)
        layout.check_digest(digest)
        now = time.time()
        with self._lock(False), self._db.tx() as cur:
            cur.execute(
                "INSERT OR REPLACE INTO refs(repository, name, digest, updated, etag, "
                "last_modified, source, checked) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (repository, name, digest, now, etag, last_modified, source, now),
            )

    def confirm(self, repository: str, name: str, digest: bytes) -> bool:
        """Note that the repository confirmed, now, that ``name`` still designates ``digest``
        (an HTTP 304). False if the store no longer records that."""
        with self._lock(False), self._db.tx() as cur:
            cur.execute(
                "UPDATE refs SET checked = ? WHERE repository = ? AND name = ? AND digest = ?",
                (time.time(), repository, name, digest),
            )
            return cur.rowcount > 0

    def get(self, repository: str, name: str) -> bytes | None:
        rows = self._db.query(
            "SELECT digest FROM refs WHERE repository = ? AND name = ?", (repository, name)
        )
        return bytes(rows[0][0]) if rows else None

    def record(self, repository: str, name: str) -> RefRecord | None:
        """What the store knows of ``name`` in ``repository``: its digest, when the
        repository last confirmed it, and the validators of that answer."""
        rows = self._db.query(
            "SELECT digest, coalesce(checked, updated), etag, last_modified, source FROM refs "
            "WHERE repository = ? AND name = ?",
            (repository, name),
        )
        if not rows:
            return None
        digest, checked, etag, last_modified, source = rows[0]
        return RefRecord(bytes(digest), float(checked), etag, last_modified, source)
