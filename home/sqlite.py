"""Shared SQLite helpers for home's databases (home.sqlite3, identity.db).

Opening is where damage shows first: :func:`connect` refuses a file that is not
a database (garbage header, an empty file where a database existed) with one
sentence and what to do, and :func:`quick_check` (``serve`` runs it at start)
finds damaged pages before they surface as a traceback in the middle of a
request. A database that existed is never silently created again.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

from tether.home.paths import StateError

#: What a write to a store raises when home's own disk fails (full, read-only, I/O
#: error, damaged file): callers that only keep records catch these and go on.
WRITE_ERRORS: tuple[type[BaseException], ...] = (sqlite3.OperationalError,
                                                 sqlite3.DatabaseError, OSError)
#: Any failure of the database engine behind a store (damaged file, full disk, locked
#: database, a statement it refused). Callers outside the store modules catch this,
#: never the engine's own exception classes, so another engine changes only the stores.
ENGINE_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error,)


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


class DatabaseUnusable(StateError):
    """A database file in home's state directory cannot be used; the text says what to do."""


def connect(path: Path, *, timeout: float, hint: str, existing: bool = True) -> sqlite3.Connection:
    """Open ``path`` (autocommit, WAL, rows as :class:`sqlite3.Row`).

    ``existing``: the file is supposed to hold a database already, so an empty
    one is a truncated database, refused rather than silently made anew.
    ``hint`` says what the operator should do about a refused file.
    """
    if existing and path.exists() and path.stat().st_size == 0:
        raise DatabaseUnusable(f"{path} is empty (0 bytes): the database was truncated; {hint}")
    db = None
    try:
        db = sqlite3.connect(str(path), timeout=timeout, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.DatabaseError as exc:
        if db is not None:
            db.close()
        raise DatabaseUnusable(f"{path} is not a usable SQLite database ({exc}); {hint}") \
            from None
    return db


def quick_check(db: sqlite3.Connection, path: Path, hint: str) -> None:
    """``PRAGMA quick_check``: refuse a database with damaged pages or indexes."""
    try:
        problems = [" ".join(str(row[0]).split()) for row in
                    db.execute("PRAGMA quick_check(3)")]
    except sqlite3.DatabaseError as exc:
        problems = [str(exc)]
    if problems != ["ok"]:
        raise DatabaseUnusable(f"{path} is damaged (quick_check: {'; '.join(problems)[:300]}); "
                               f"{hint}")
