"""SQLite helpers shared by the node store and the CSI servers' state."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager


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
