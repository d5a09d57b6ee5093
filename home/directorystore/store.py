"""Home's directory store: the synced users and groups of every directory.

Its own SQLite file (``identity.db`` in the state directory, 0600, WAL) so that a
100,000-user snapshot never bloats or locks home's control database, and the CLI
can export while ``serve`` writes.

Records are keyed by ``(directory, id)`` where ``id`` is entryUUID / objectGUID:
a rename or move is an upsert of the same id with a new DN, never a delete plus
an add. The agent streams engine messages (agent/directory/README.md):

* ``begin(full)`` opens a *staging* snapshot; its chunks go there; ``end`` swaps
  staging in for the live snapshot in one transaction and stores the cursor. A
  full sync that never ends (agent died, leader changed) leaves the old
  snapshot untouched: the staging rows are discarded by the next ``begin``.
* incremental ``begin``/``chunk``/``end`` apply upserts (whole states) and
  deletes (a no-op for an unknown id) directly, ``end`` stores the cursor.
* ``error`` (the agent could not sync: bind refused, server down...) is kept as
  the directory's last error for ``directory status``, touching neither records
  nor cursor; an applied ``end`` clears it.

Exactly once: every ``directory.changes`` batch is applied in ONE transaction
together with the per-(directory, instance) ``applied_through`` seq, and seqs at
or below it are skipped; an agent re-sending after a lost response changes
nothing. Speed: runs of upserts/deletes go through ``executemany``, one commit
per batch.

This module is the store's face (:class:`DirectoryStore`): opening, transactions
and the reads. The write path of a batch is :mod:`.apply`, membership
:mod:`.members`, the table layout :mod:`.schema`, the CSV export :mod:`.export`.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

from tether import protocol
from tether.home import sqlite as sqlite_helpers
from tether.home.directorystore import members
from tether.home.directorystore.apply import ChangeWriter
from tether.home.directorystore.export import write_csv
from tether.home.directorystore.records import BatchResult, DirectoryStoreError, decode_row
from tether.home.directorystore.schema import SCHEMA, migrate
from tether.home.sqlite import Transaction

#: What to do about an identity.db that cannot be used.
RESTORE_HINT = ("stop home and restore identity.db from a backup, or move it away to start "
                "with no synced users (the connectors' next full sync fills it again)")


#: SQLite page cache of identity.db (KiB): a 100,000-entry full sync keeps its hot pages.
CACHE_KIB = 32 * 1024


class DirectoryStore:
    """Typed access to ``identity.db``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        fresh = not self.path.exists()
        if fresh:
            self.path.touch(mode=0o600, exist_ok=True)
        self.path.chmod(0o600)
        # a file that existed must still be a database: never recreate it empty
        self.db = sqlite_helpers.connect(self.path, timeout=30, hint=RESTORE_HINT,
                                         existing=not fresh)
        # Why: entry ids (entryUUID, objectGUID) are random, so every batch of a full
        # sync writes all over the staging and membership trees; with SQLite's default
        # 2 MiB page cache each of those writes first reads its page back from the OS.
        # Memory only (allocated as used): durability is unchanged.
        self.db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        try:
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise sqlite_helpers.DatabaseUnusable(f"{self.path} cannot be read ({exc}); "
                                                  f"{RESTORE_HINT}") from None
        migrate(self.db)
        self.changes = ChangeWriter(self.db)
        for suffix in ("-wal", "-shm"):  # SQLite creates them with the umask: tighten
            side = Path(str(self.path) + suffix)
            if side.exists():
                os.chmod(side, 0o600)

    @classmethod
    def open_existing(cls, path: Path) -> DirectoryStore | None:
        """For read-only commands: None when no sync ever created the file."""
        return cls(path) if Path(path).exists() else None

    def check(self) -> None:
        """Refuse a damaged database (``serve`` calls this once at start)."""
        sqlite_helpers.quick_check(self.db, self.path, RESTORE_HINT)

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ writing

    def applied_through(self, directory: str, instance_id: str) -> int:
        """The last seq of ``instance_id``'s spool applied to ``directory`` (0: none yet)."""
        return self.changes.applied_through(directory, instance_id)

    def apply_batch(self, directory: str, instance_id: str, entries: list[dict],
                    after: int | None = None) -> BatchResult:
        """Apply one ``directory.changes`` batch exactly once, in one transaction.

        ``entries`` is ``[{"seq": int, "message": dict}, ...]`` in increasing seq
        order (the caller validated the shape). ``after`` (a pipelined batch: the
        last seq of the batch the agent sent before it) must already be applied,
        else nothing is (``out_of_order``): applying it would skip that batch's
        changes for good. Raises :class:`DirectoryStoreError` (nothing applied) for a
        malformed message or record.
        """
        self.db.execute("BEGIN IMMEDIATE")
        try:
            through = self.applied_through(directory, instance_id)
            if after is not None and through < after:
                result = BatchResult(applied_through=through, out_of_order=True)
                result.notes.append(f"previous batch (through seq {after}) not applied yet")
            else:
                result = self.changes.apply(directory, instance_id, entries)
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        return result

    def record_dropped(self, directory: str, instance_id: str, through: int) -> int:
        """A non-leader's batch was dropped on purpose: remember it as handled, so a
        re-send after this instance becomes leader is not applied out of context."""
        with self._tx():
            current = self.applied_through(directory, instance_id)
            if through > current:
                self.changes.set_applied(directory, instance_id, through)
        return max(through, current)

    def _tx(self):
        return Transaction(self.db)

    def record_error(self, directory: str, instance_id: str | None, error: dict) -> None:
        """Home's own finding (an instance refused ``sync``) as the directory's last error."""
        try:
            checked = protocol.changes.decode({**error, "type": "error"})
        except protocol.ProtocolError as exc:
            raise DirectoryStoreError(exc.detail) from None
        with self._tx():
            self.changes.store_error(directory, instance_id, checked)

    def last_error(self, directory: str) -> dict | None:
        """``{code, message, hint, server, at, instance, received_at}`` or None when syncing."""
        row = self.db.execute("SELECT * FROM directory_errors WHERE directory = ?",
                              (directory,)).fetchone()
        if row is None:
            return None
        out = {k: row[k] for k in ("code", "message", "hint", "server", "at", "received_at")}
        out["instance"] = row["instance_id"]
        return out

    # ------------------------------------------------------------------ reading

    def cursor(self, directory: str) -> str | None:
        row = self.db.execute("SELECT cursor FROM directories WHERE directory = ?",
                              (directory,)).fetchone()
        return row[0] if row else None

    def directories(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT directory FROM directories "
                                              "ORDER BY directory")]

    def known(self, directory: str) -> bool:
        return self.db.execute("SELECT 1 FROM directories WHERE directory = ?",
                               (directory,)).fetchone() is not None

    def counts(self, directory: str) -> dict:
        counts = {"users": 0, "groups": 0}
        for kind, n in self.db.execute("SELECT kind, COUNT(*) FROM entries WHERE directory = ? "
                                       "GROUP BY kind", (directory,)):
            counts[f"{kind}s"] = n
        counts["staging"] = self.db.execute("SELECT COUNT(*) FROM staging WHERE directory = ?",
                                            (directory,)).fetchone()[0]
        return counts

    def status(self, directory: str) -> dict:
        """Cursor, counts, stream state and applied_through per instance."""
        row = self.db.execute("SELECT * FROM directories WHERE directory = ?",
                              (directory,)).fetchone()
        state = dict(row) if row else {"directory": directory}
        state.update(self.counts(directory))
        state["applied_through"] = {
            r["instance_id"]: r["applied_through"] for r in self.db.execute(
                "SELECT instance_id, applied_through FROM applied WHERE directory = ? "
                "ORDER BY instance_id", (directory,))}
        state["error"] = self.last_error(directory)
        state["problems"] = self.problems(directory)
        state["unresolved_members"] = self.unresolved_members(directory)
        state["member_loops"] = self.member_loops(directory)
        return state

    def entries(self, directory: str, kind: str | None = None) -> Iterator[dict]:
        """Live snapshot records (decoded), users then groups, by DN."""
        sql = "SELECT * FROM entries WHERE directory = ?"
        args: list = [directory]
        if kind:
            sql += " AND kind = ?"
            args.append(kind)
        for row in self.db.execute(sql + " ORDER BY kind DESC, dn", args):
            yield decode_row(row)

    def entry(self, directory: str, rid: str) -> dict | None:
        row = self.db.execute("SELECT * FROM entries WHERE directory = ? AND id = ?",
                              (directory, rid)).fetchone()
        return decode_row(row) if row else None

    # ---- membership (the interface the SCIM Groups API reads)

    # ---- membership (the interface the SCIM Groups API reads): tether.home.directorystore.members

    def members_of(self, directory: str, group_id: str) -> list[dict]:
        return members.members_of(self.db, directory, group_id)

    def groups_of(self, directory: str, entry_id: str) -> list[dict]:
        return members.groups_of(self.db, directory, entry_id)

    def member_entries(self, directory: str, group_id: str) -> list[dict]:
        return members.member_entries(self.db, directory, group_id)

    def unresolved_members(self, directory: str, limit: int = 20) -> dict:
        return members.unresolved_members(self.db, directory, limit)

    def member_loops(self, directory: str, limit: int = 20) -> list[list[dict]]:
        return members.member_loops(self.db, directory, limit)

    def problems(self, directory: str, limit: int = 20) -> dict:
        """Entries whose data could not be carried as is, with what and why."""
        sql = "FROM entries WHERE directory = ? AND problems IS NOT NULL"
        count = self.db.execute("SELECT COUNT(*) " + sql, (directory,)).fetchone()[0]
        items = []
        for rid, edn, raw in self.db.execute("SELECT id, dn, problems " + sql +
                                             " ORDER BY dn_key LIMIT ?", (directory, limit)):
            for p in json.loads(raw):
                items.append({"id": rid, "dn": edn, "code": str(p.get("code")),
                              "message": str(p.get("message")), "attribute": p.get("attribute")})
        return {"entries": count, "items": items}

    # ------------------------------------------------------------ SCIM lookups

    #: record fields that have an index for case-insensitive equality
    INDEXED_FIELDS = ("username", "name")

    def find_by_field(self, directory: str, kind: str, field: str, value: str) -> list[dict]:
        """Records whose ``field`` equals ``value`` ignoring case (indexed)."""
        if field not in self.INDEXED_FIELDS:
            raise ValueError(f"no index on {field!r}; indexed: {', '.join(self.INDEXED_FIELDS)}")
        rows = self.db.execute(
            f"SELECT * FROM entries INDEXED BY entries_{field} WHERE directory = ? AND kind = ? AND "
            f"lower(json_extract(attributes, '$.{field}')) = lower(?) ORDER BY id",
            (directory, kind, value))
        return [decode_row(r) for r in rows]

    def count_kind(self, directory: str, kind: str) -> int:
        return self.db.execute("SELECT COUNT(*) FROM entries WHERE directory = ? AND kind = ?",
                               (directory, kind)).fetchone()[0]

    def page(self, directory: str, kind: str, offset: int, limit: int) -> list[dict]:
        """Records of one kind in id order, ``limit`` from ``offset`` (0-based)."""
        rows = self.db.execute("SELECT * FROM entries WHERE directory = ? AND kind = ? "
                               "ORDER BY id LIMIT ? OFFSET ?", (directory, kind, limit, offset))
        return [decode_row(r) for r in rows]

    def after(self, directory: str, kind: str, after_id: str, limit: int) -> list[dict]:
        """Records of one kind with id above ``after_id``, in id order (a resumable scan)."""
        rows = self.db.execute("SELECT * FROM entries WHERE directory = ? AND kind = ? AND id > ? "
                               "ORDER BY id LIMIT ?", (directory, kind, after_id, limit))
        return [decode_row(r) for r in rows]

    def external_ids(self, directory: str, ids: Iterable[str]) -> dict[str, str]:
        wanted = list(dict.fromkeys(ids))
        out: dict[str, str] = {}
        for start in range(0, len(wanted), 500):
            part = wanted[start:start + 500]
            out.update(self.db.execute(
                f"SELECT id, external_id FROM external_ids WHERE directory = ? AND id IN "
                f"({','.join('?' * len(part))})", (directory, *part)).fetchall())
        return out

    def by_external_id(self, directory: str, kind: str, external_id: str) -> list[dict]:
        rows = self.db.execute(
            "SELECT * FROM entries WHERE directory = ? AND id IN (SELECT id FROM external_ids "
            "WHERE directory = ? AND external_id = ?) AND kind = ? ORDER BY id",
            (directory, directory, external_id, kind))
        return [decode_row(r) for r in rows]

    def set_external_id(self, directory: str, rid: str, external_id: str | None) -> None:
        with self._tx():
            if external_id is None:
                self.db.execute("DELETE FROM external_ids WHERE directory = ? AND id = ?",
                                (directory, rid))
            else:
                self.db.execute("INSERT OR REPLACE INTO external_ids VALUES (?, ?, ?)",
                                (directory, rid, external_id))

    def put_provisioned(self, directory: str, record: dict) -> None:
        """Store the state a provisioning order read back (an ``upsert`` record).

        Also into an open full snapshot: its swap must not drop an entry written
        after its pages were read. Whole states, written as the sync writes them
        (memberships included), so the sync bringing the same change later rewrites
        the same rows."""
        record = {**record, "op": "upsert"}
        with self._tx():
            self.changes.records(directory, "entries", [record])
            if self._staging_open(directory):
                self.changes.records(directory, "staging", [record])

    def drop_provisioned(self, directory: str, rid: str) -> None:
        """Forget an entry a provisioning order deleted (and its externalId)."""
        with self._tx():
            for table in ("entries", "staging"):
                self.changes.records(directory, table, [{"op": "delete", "id": rid}])
            self.db.execute("DELETE FROM external_ids WHERE directory = ? AND id = ?",
                            (directory, rid))

    def _staging_open(self, directory: str) -> bool:
        return self.db.execute("SELECT 1 FROM staging WHERE directory = ? LIMIT 1",
                               (directory,)).fetchone() is not None

    def export_csv(self, directory: str, out: Path) -> dict:
        """Write the snapshot as CSV (format: :func:`~.export.csv_columns`), atomically."""
        written = write_csv(list(self.entries(directory)),
                            members.member_of_all(self.db, directory), out)
        return {"directory": directory, **written}
