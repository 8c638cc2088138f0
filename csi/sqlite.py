"""SQLite helpers shared by the node store and the CSI servers' state."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

#: Seconds a connection waits for another one's lock (SQLite's busy handler).
BUSY_TIMEOUT = 120.0


def is_busy(e: sqlite3.OperationalError) -> bool:
    """``database is locked`` / ``database table is locked`` (SQLITE_BUSY, SQLITE_LOCKED)."""
    return "locked" in str(e) or "busy" in str(e)


def retry_busy(
    step: Callable[[], T],
    *,
    timeout: float = BUSY_TIMEOUT,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``step``, again while it fails with SQLITE_BUSY, for up to ``timeout`` seconds.

    SQLite answers some lock conflicts without calling the busy handler at all: switching a
    database to WAL while another connection is recovering or converting it is one. Processes
    that open one database at the same moment (a node's plugins start together) meet exactly
    that, so opening retries here instead of failing at random."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            return step()
        except sqlite3.OperationalError as e:
            if not is_busy(e) or time.monotonic() + delay > deadline:
                raise
        sleep(delay)
        delay = min(delay * 2, 0.25)


def open_database(
    path: Path, *, synchronous: str = "NORMAL", setup: Callable[[sqlite3.Connection], object]
) -> sqlite3.Connection:
    """A connection (autocommit, any thread) to the WAL database at ``path``; ``setup`` (the
    schema) runs once the journal mode is set. Both steps retry while another process holds
    the database (:func:`retry_busy`)."""
    con = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
    try:
        con.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")

        def wal() -> None:
            mode = con.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() != "wal":
                con.execute("PRAGMA journal_mode = WAL")

        retry_busy(wal)
        con.execute(f"PRAGMA synchronous = {synchronous}")
        retry_busy(lambda: setup(con))
    except BaseException:
        con.close()
        raise
    return con


@contextmanager
def write_transaction(
    con: sqlite3.Connection, lock: AbstractContextManager[object]
) -> Iterator[sqlite3.Cursor]:
    """A write transaction (``BEGIN IMMEDIATE``) on ``con``, serialised by ``lock`` (the
    connection owner's lock); committed when the block succeeds, rolled back when it raises."""
    with lock:
        cur = con.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        cur.execute("COMMIT")
