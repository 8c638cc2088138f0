"""The node plugin's record of its volumes (SQLite), so a restart knows what it published.

Every step that changes the node is recorded *before* it is made (``state`` says how far it
got), so start-up reconciliation (:meth:`csi.server.volumes.VolumeManager.reconcile`) can finish
or undo whatever a killed process left half done.

``volumes``: one row per volume id that holds a store lease: staged persistent volumes and
published ephemeral ones. ``targets``: one row per target path (a bind mount).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from csi.sqlite import open_database, write_transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS volumes (
    volume_id    TEXT PRIMARY KEY,
    kind         TEXT NOT NULL,          -- 'ephemeral' | 'persistent'
    repository   TEXT NOT NULL,
    images       TEXT NOT NULL,          -- hex digests, lowest layer first, ','-joined
    lazy         INTEGER NOT NULL,
    staging_path TEXT,                   -- persistent volumes: where they were staged
    state        TEXT NOT NULL,          -- 'staging' | 'ready' | 'unstaging'
    created      REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS targets (
    target_path  TEXT PRIMARY KEY,
    volume_id    TEXT NOT NULL,
    view_key     TEXT,
    view_path    TEXT,
    state        TEXT NOT NULL,          -- 'publishing' | 'published' | 'unpublishing'
    created      REAL NOT NULL,
    made_dir     INTEGER NOT NULL DEFAULT 1  -- the plugin created the target directory
);
CREATE INDEX IF NOT EXISTS targets_by_volume ON targets(volume_id);
"""


@dataclass(frozen=True, slots=True)
class VolumeRecord:
    volume_id: str
    kind: str
    repository: str
    images: tuple[bytes, ...]
    lazy: bool
    staging_path: str | None
    state: str

    @property
    def ephemeral(self) -> bool:
        return self.kind == "ephemeral"


@dataclass(frozen=True, slots=True)
class TargetRecord:
    target_path: str
    volume_id: str
    view_key: str | None
    view_path: str | None
    state: str
    #: The plugin created the directory (so it removes it when unpublishing, and only then).
    made_dir: bool = True


def _volume(row: tuple[object, ...]) -> VolumeRecord:
    images = str(row[3])
    return VolumeRecord(
        volume_id=str(row[0]),
        kind=str(row[1]),
        repository=str(row[2]),
        images=tuple(bytes.fromhex(h) for h in images.split(",") if h),
        lazy=bool(row[4]),
        staging_path=None if row[5] is None else str(row[5]),
        state=str(row[6]),
    )


def _target(row: tuple[object, ...]) -> TargetRecord:
    return TargetRecord(
        target_path=str(row[0]),
        volume_id=str(row[1]),
        view_key=None if row[2] is None else str(row[2]),
        view_path=None if row[3] is None else str(row[3]),
        state=str(row[4]),
        made_dir=bool(row[6]),
    )


def _setup(c: sqlite3.Connection) -> None:
    c.executescript(_SCHEMA)
    columns = {str(r[1]) for r in c.execute("PRAGMA table_info(targets)")}
    if "made_dir" not in columns:  # a state file of an older version: it made every target
        c.execute("ALTER TABLE targets ADD COLUMN made_dir INTEGER NOT NULL DEFAULT 1")


class NodeState:
    """Thread-safe; every write is its own committed transaction."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._mu = threading.Lock()
        self._db = open_database(self.path, synchronous="FULL", setup=_setup)

    def close(self) -> None:
        with self._mu:
            self._db.close()

    def _tx(self) -> AbstractContextManager[sqlite3.Cursor]:
        return write_transaction(self._db, self._mu)

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self._mu:
            return list(self._db.execute(sql, args).fetchall())

    # -- volumes ---------------------------------------------------------------------------

    def volume(self, volume_id: str) -> VolumeRecord | None:
        rows = self._query("SELECT * FROM volumes WHERE volume_id = ?", (volume_id,))
        return _volume(rows[0]) if rows else None

    def volumes(self) -> list[VolumeRecord]:
        return [_volume(r) for r in self._query("SELECT * FROM volumes ORDER BY created")]

    def put_volume(
        self,
        volume_id: str,
        *,
        kind: str,
        repository: str,
        images: tuple[bytes, ...],
        lazy: bool,
        staging_path: str | None,
        state: str,
    ) -> None:
        with self._tx() as cur:
            cur.execute(
                "INSERT OR REPLACE INTO volumes VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    volume_id,
                    kind,
                    repository,
                    ",".join(d.hex() for d in images),
                    int(lazy),
                    staging_path,
                    state,
                    time.time(),
                ),
            )

    def set_volume_state(self, volume_id: str, state: str) -> None:
        with self._tx() as cur:
            cur.execute("UPDATE volumes SET state = ? WHERE volume_id = ?", (state, volume_id))

    def delete_volume(self, volume_id: str) -> None:
        with self._tx() as cur:
            cur.execute("DELETE FROM volumes WHERE volume_id = ?", (volume_id,))

    # -- targets ---------------------------------------------------------------------------

    def target(self, target_path: str) -> TargetRecord | None:
        rows = self._query("SELECT * FROM targets WHERE target_path = ?", (target_path,))
        return _target(rows[0]) if rows else None

    def targets(self, volume_id: str | None = None) -> list[TargetRecord]:
        if volume_id is None:
            rows = self._query("SELECT * FROM targets ORDER BY created")
        else:
            rows = self._query(
                "SELECT * FROM targets WHERE volume_id = ? ORDER BY created", (volume_id,)
            )
        return [_target(r) for r in rows]

    def put_target(self, target_path: str, volume_id: str, state: str, *, made_dir: bool) -> None:
        with self._tx() as cur:
            cur.execute(
                "INSERT OR REPLACE INTO targets (target_path, volume_id, view_key, view_path, "
                "state, created, made_dir) VALUES (?, ?, NULL, NULL, ?, ?, ?)",
                (target_path, volume_id, state, time.time(), int(made_dir)),
            )

    def set_target_view(self, target_path: str, key: str, path: str) -> None:
        with self._tx() as cur:
            cur.execute(
                "UPDATE targets SET view_key = ?, view_path = ? WHERE target_path = ?",
                (key, path, target_path),
            )

    def set_target_state(self, target_path: str, state: str) -> None:
        with self._tx() as cur:
            cur.execute("UPDATE targets SET state = ? WHERE target_path = ?", (state, target_path))

    def delete_target(self, target_path: str) -> None:
        with self._tx() as cur:
            cur.execute("DELETE FROM targets WHERE target_path = ?", (target_path,))
