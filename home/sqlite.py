"""Shared SQLite helpers for home's databases (store.db, identity.db)."""
from __future__ import annotations

import sqlite3

#: What a write to a store raises when home's own disk fails (full, read-only, I/O
#: error, damaged file): callers that only keep records catch these and go on.
WRITE_ERRORS: tuple[type[BaseException], ...] = (sqlite3.OperationalError,
                                                 sqlite3.DatabaseError, OSError)


class Transaction:
    """``with Transaction(db):`` — BEGIN IMMEDIATE ... COMMIT/ROLLBACK.

    The connection must be opened with ``isolation_level=None`` (autocommit), so that
    the explicit BEGIN/COMMIT here are the only transaction boundaries.
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
