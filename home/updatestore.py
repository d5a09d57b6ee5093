"""Home's record of whole-image updates (issue 14): bundles, rollouts, per-instance progress.

Its own SQLite file (``updates.sqlite3`` in the state directory), next to
home.sqlite3 and identity.db, so every SQL statement about updates lives in
this one store module: a PostgreSQL home replaces this class, not its users.
The bundles themselves are files under ``update/bundles/`` (``<version>.raucb``),
published by ``tether-home update publish`` after RAUC checked their
signature against this home's update CA.
"""

from __future__ import annotations

import time
from pathlib import Path

from tether.home.sqlite import Transaction, connect

SCHEMA = """
CREATE TABLE IF NOT EXISTS bundles (
    version TEXT PRIMARY KEY, file TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
    compatible TEXT NOT NULL, published_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rollouts (
    version TEXT NOT NULL, connector TEXT NOT NULL, canary INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'active', created_at REAL NOT NULL,
    deadline_seconds INTEGER NOT NULL DEFAULT 300, PRIMARY KEY (version, connector));
CREATE TABLE IF NOT EXISTS progress (
    instance_id TEXT NOT NULL, version TEXT NOT NULL, connector TEXT NOT NULL,
    state TEXT NOT NULL, percent INTEGER, detail TEXT, journal TEXT, slot TEXT,
    updated_at REAL NOT NULL, PRIMARY KEY (instance_id, version));
CREATE TABLE IF NOT EXISTS running (
    instance_id TEXT PRIMARY KEY, connector TEXT NOT NULL, image_version TEXT,
    boot_slot TEXT, seen_at REAL NOT NULL);
"""
HINT = "restore updates.sqlite3 from a backup or delete it (published bundles must then be published again)"


class UpdateStore:
    """Bundles, rollouts and update progress; one connection, autocommit plus explicit transactions."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = connect(path, timeout=10.0, hint=HINT, existing=path.exists())
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def _all(self, sql: str, args=()) -> list[dict]:
        return [dict(row) for row in self.db.execute(sql, tuple(args))]

    def _one(self, sql: str, args=()) -> dict | None:
        row = self.db.execute(sql, tuple(args)).fetchone()
        return dict(row) if row else None

    # ---------------------------------------------------------------- bundles

    def add_bundle(self, version: str, file: str, sha256: str, size: int, compatible: str) -> None:
        with Transaction(self.db):
            self.db.execute("INSERT OR REPLACE INTO bundles VALUES (?, ?, ?, ?, ?, ?)",
                            (version, file, sha256, size, compatible, time.time()))

    def bundle(self, version: str) -> dict | None:
        return self._one("SELECT * FROM bundles WHERE version = ?", (version,))

    def bundles(self) -> list[dict]:
        return self._all("SELECT * FROM bundles ORDER BY published_at")

    # --------------------------------------------------------------- rollouts

    def start_rollout(self, version: str, connector: str, canary: int, deadline_seconds: int = 300) -> None:
        """A new rollout for the connector; older active ones are superseded (aborted)."""
        with Transaction(self.db):
            self.db.execute("UPDATE rollouts SET status = 'aborted' WHERE connector = ? "
                            "AND version != ? AND status != 'aborted'", (connector, version))
            self.db.execute("INSERT OR REPLACE INTO rollouts VALUES (?, ?, ?, 'active', ?, ?)",
                            (version, connector, canary, time.time(), deadline_seconds))

    def set_rollout_status(self, connector: str, status: str) -> dict | None:
        row = self.rollout(connector)
        if row is None:
            return None
        with Transaction(self.db):
            self.db.execute("UPDATE rollouts SET status = ? WHERE version = ? AND connector = ?",
                            (status, row["version"], connector))
        return self.rollout(connector)

    def rollout(self, connector: str) -> dict | None:
        """The connector's newest rollout (active, paused or aborted)."""
        return self._one("SELECT * FROM rollouts WHERE connector = ? ORDER BY created_at DESC LIMIT 1",
                         (connector,))

    def rollouts(self) -> list[dict]:
        return self._all("SELECT * FROM rollouts ORDER BY connector, created_at")

    # --------------------------------------------------------------- progress

    def set_progress(self, instance_id: str, version: str, connector: str, state: str, *,
                     percent: int | None = None, detail: str | None = None,
                     journal: str | None = None, slot: str | None = None) -> None:
        with Transaction(self.db):
            self.db.execute(
                "INSERT INTO progress VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (instance_id, version) DO UPDATE SET state = excluded.state, "
                "percent = excluded.percent, detail = COALESCE(excluded.detail, detail), "
                "journal = COALESCE(excluded.journal, journal), slot = COALESCE(excluded.slot, slot), "
                "updated_at = excluded.updated_at",
                (instance_id, version, connector, state, percent, detail, journal, slot, time.time()))

    def progress(self, instance_id: str, version: str) -> dict | None:
        return self._one("SELECT * FROM progress WHERE instance_id = ? AND version = ?",
                         (instance_id, version))

    def progress_of(self, connector: str | None = None) -> list[dict]:
        if connector is None:
            return self._all("SELECT * FROM progress ORDER BY connector, instance_id, updated_at")
        return self._all("SELECT * FROM progress WHERE connector = ? ORDER BY instance_id, updated_at",
                         (connector,))

    # ---------------------------------------------------------------- running

    def record_running(self, instance_id: str, connector: str, image_version: str | None,
                       boot_slot: str | None) -> None:
        with Transaction(self.db):
            self.db.execute("INSERT OR REPLACE INTO running VALUES (?, ?, ?, ?, ?)",
                            (instance_id, connector, image_version, boot_slot, time.time()))

    def running(self, connector: str | None = None) -> list[dict]:
        if connector is None:
            return self._all("SELECT * FROM running ORDER BY connector, instance_id")
        return self._all("SELECT * FROM running WHERE connector = ? ORDER BY instance_id", (connector,))
