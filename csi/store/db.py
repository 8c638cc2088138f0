"""The store's SQLite state (``state.db``, WAL): objects, images, references, leases, pins, refs.

One connection per :class:`StateDB`, serialised by a mutex (calls are short). Several processes
may share the file: write transactions are ``BEGIN IMMEDIATE`` with a generous busy timeout.
Totals (bytes, files) are kept by triggers so reading them costs one row.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from csi.sqlite import open_database, write_transaction

SCHEMA_VERSION = 1
#: Page cache per connection, KiB (SQLite's default is 2000).
CACHE_KIB = 32 << 10

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS objects(
    digest BLOB PRIMARY KEY, size INTEGER NOT NULL, kind TEXT NOT NULL,
    added REAL NOT NULL, verity INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS images(
    digest BLOB PRIMARY KEY, last_used REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS image_objects(
    image BLOB NOT NULL, object BLOB NOT NULL, PRIMARY KEY(image, object)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases(
    holder TEXT NOT NULL, image BLOB NOT NULL, since REAL NOT NULL,
    PRIMARY KEY(holder, image)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pins(
    token TEXT NOT NULL, pid INTEGER NOT NULL, image BLOB NOT NULL,
    PRIMARY KEY(token, image)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pin_owners(
    token TEXT PRIMARY KEY, owner TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS refs(
    repository TEXT NOT NULL, name TEXT NOT NULL, digest BLOB NOT NULL, updated REAL NOT NULL,
    etag TEXT, last_modified TEXT, source TEXT, checked REAL,
    PRIMARY KEY(repository, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS totals(
    id INTEGER PRIMARY KEY CHECK (id = 0), bytes INTEGER NOT NULL, files INTEGER NOT NULL);
INSERT OR IGNORE INTO totals VALUES (0, 0, 0);
CREATE TRIGGER IF NOT EXISTS objects_ins AFTER INSERT ON objects BEGIN
    UPDATE totals SET bytes = bytes + NEW.size, files = files + 1 WHERE id = 0; END;
CREATE TRIGGER IF NOT EXISTS objects_del AFTER DELETE ON objects BEGIN
    UPDATE totals SET bytes = bytes - OLD.size, files = files - 1 WHERE id = 0; END;
CREATE TRIGGER IF NOT EXISTS objects_upd AFTER UPDATE OF size ON objects BEGIN
    UPDATE totals SET bytes = bytes - OLD.size + NEW.size WHERE id = 0; END;
"""


_REF_COLUMNS = (
    ("etag", "TEXT"),
    ("last_modified", "TEXT"),
    ("source", "TEXT"),
    ("checked", "REAL"),
)


class StateDB:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._mu = threading.RLock()

        def setup(c: sqlite3.Connection) -> None:
            c.execute("PRAGMA wal_autocheckpoint = 256")
            c.execute(f"PRAGMA cache_size = {-CACHE_KIB}")
            c.execute("PRAGMA journal_size_limit = 4194304")
            with write_transaction(c, self._mu) as cur:
                for stmt in _SCHEMA.split(";\n"):
                    if stmt.strip():
                        cur.execute(stmt)
                # No query looks image rows up by object (GC reads them all): the index that
                # stores made before 2026-12-07 kept cost a third of recording a new image.
                cur.execute("DROP INDEX IF EXISTS image_objects_by_object")
                # Stores made before refs kept their HTTP validators (issue 14).
                have = {row[1] for row in cur.execute("PRAGMA table_info(refs)")}
                for column, kind in _REF_COLUMNS:
                    if column not in have:
                        cur.execute(f"ALTER TABLE refs ADD COLUMN {column} {kind}")
                cur.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )

        self._con = open_database(path, setup=setup)

    def close(self) -> None:
        with self._mu:
            self._con.close()

    def tx(self) -> AbstractContextManager[sqlite3.Cursor]:
        """A write transaction (``BEGIN IMMEDIATE``), committed on success."""
        return write_transaction(self._con, self._mu)

    def query(self, sql: str, args: Iterable[object] = ()) -> list[Any]:
        with self._mu:
            return self._con.execute(sql, tuple(args)).fetchall()

    # -- objects and images ----------------------------------------------------------------

    def record_object(
        self,
        cur: sqlite3.Cursor,
        digest: bytes,
        size: int,
        kind: str,
        verity: bool,
    ) -> None:
        cur.execute(
            "INSERT INTO objects VALUES (?, ?, ?, ?, ?) ON CONFLICT(digest) DO UPDATE SET "
            "size = excluded.size, verity = max(verity, excluded.verity), "
            "kind = CASE WHEN excluded.kind = 'image' THEN 'image' ELSE kind END",
            (digest, size, kind, time.time(), int(verity)),
        )

    def record_objects(
        self, cur: sqlite3.Cursor, rows: Iterable[tuple[bytes, int, str, bool]]
    ) -> None:
        """:meth:`record_object` for many (digest, size, kind, verity) rows at once."""
        now = time.time()
        cur.executemany(
            "INSERT INTO objects VALUES (?, ?, ?, ?, ?) ON CONFLICT(digest) DO UPDATE SET "
            "size = excluded.size, verity = max(verity, excluded.verity), "
            "kind = CASE WHEN excluded.kind = 'image' THEN 'image' ELSE kind END",
            sorted((d, size, kind, now, int(verity)) for d, size, kind, verity in rows),
        )

    def record_image(self, cur: sqlite3.Cursor, digest: bytes, objects: Iterable[bytes]) -> None:
        cur.execute(
            "INSERT OR IGNORE INTO images VALUES (?, ?)",
            (digest, time.time()),
        )
        cur.execute("UPDATE objects SET kind = 'image' WHERE digest = ?", (digest,))
        cur.executemany(
            "INSERT OR IGNORE INTO image_objects VALUES (?, ?)",
            ((digest, o) for o in sorted(objects)),
        )

    def drop_object(self, cur: sqlite3.Cursor, digest: bytes) -> None:
        cur.execute("DELETE FROM objects WHERE digest = ?", (digest,))

    def drop_image(self, cur: sqlite3.Cursor, digest: bytes) -> None:
        cur.execute("DELETE FROM images WHERE digest = ?", (digest,))
        cur.execute("DELETE FROM image_objects WHERE image = ?", (digest,))
        cur.execute("DELETE FROM refs WHERE digest = ?", (digest,))

    def is_image(self, digest: bytes) -> bool:
        return bool(self.query("SELECT 1 FROM images WHERE digest = ?", (digest,)))

    def image_objects(self, digest: bytes) -> set[bytes]:
        rows = self.query("SELECT object FROM image_objects WHERE image = ?", (digest,))
        return {bytes(r[0]) for r in rows}

    def totals(self) -> tuple[int, int]:
        row = self.query("SELECT bytes, files FROM totals WHERE id = 0")[0]
        return int(row[0]), int(row[1])
