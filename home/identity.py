"""Home's identity store: the synced users and groups of every directory.

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
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tether.home import sqlite as sqlite_helpers
from tether.home.sqlite import Transaction

#: What to do about an identity.db that cannot be used.
RESTORE_HINT = ("stop home and restore identity.db from a backup, or move it away to start "
                "with no synced users (the connectors' next full sync fills it again)")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    directory TEXT NOT NULL, id TEXT NOT NULL, kind TEXT NOT NULL, dn TEXT NOT NULL,
    attributes TEXT NOT NULL, members TEXT, disabled INTEGER, password_hashes TEXT,
    PRIMARY KEY (directory, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS staging (
    directory TEXT NOT NULL, id TEXT NOT NULL, kind TEXT NOT NULL, dn TEXT NOT NULL,
    attributes TEXT NOT NULL, members TEXT, disabled INTEGER, password_hashes TEXT,
    PRIMARY KEY (directory, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS directories (
    directory TEXT PRIMARY KEY,
    cursor TEXT,
    stream_mode TEXT,          -- 'full' | 'incremental' | NULL: the stream now open
    stream_instance TEXT,      -- who sent its begin (chunks of others are not mixed in)
    synced_at REAL,            -- last completed stream (full or incremental)
    full_synced_at REAL,       -- last completed full sync (snapshot swap)
    last_change REAL,          -- last batch that changed anything
    applied INTEGER NOT NULL DEFAULT 0
);
-- why a directory does not sync: the last `error` stream message (or refused `sync`
-- request); cleared by an applied `end`. Its own table so older files gain it as is.
CREATE TABLE IF NOT EXISTS directory_errors (
    directory TEXT PRIMARY KEY, instance_id TEXT, code TEXT NOT NULL, message TEXT NOT NULL,
    hint TEXT, server TEXT, at REAL, received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS applied (
    directory TEXT NOT NULL, instance_id TEXT NOT NULL,
    applied_through INTEGER NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (directory, instance_id)
);
"""

_COLUMNS = "directory, id, kind, dn, attributes, members, disabled, password_hashes"
_UPSERT = {t: f"INSERT OR REPLACE INTO {t} ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)"
           for t in ("entries", "staging")}
_DELETE = {t: f"DELETE FROM {t} WHERE directory = ? AND id = ?" for t in ("entries", "staging")}
#: Separator of multi-valued cells in the CSV export (DNs contain commas, rarely "|").
CSV_MULTI = "|"


class IdentityError(ValueError):
    """A batch or record is malformed; nothing of its batch was applied."""


@dataclass
class BatchResult:
    """What one ``directory.changes`` batch did."""

    applied_through: int
    applied: int = 0            # stream messages applied (not skipped as already seen)
    skipped: int = 0            # messages at or below applied_through (re-sent)
    records: int = 0            # upserts + deletes written
    cursor: str | None = None   # stored by an ``end`` in this batch
    swapped: bool = False       # a full snapshot replaced the old one
    #: an ``end`` arrived whose ``begin`` home never saw (leader changed mid-stream):
    #: its cursor was not stored; home should ask the leader for a full sync.
    resync_wanted: bool = False
    #: the batch named an ``after`` seq not applied yet: nothing was applied
    out_of_order: bool = False
    notes: list[str] = field(default_factory=list)


def _db_json(value) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"), sort_keys=True)


def _row(directory: str, record: dict) -> tuple:
    """An upsert record as a row; missing mandatory fields refuse the batch."""
    try:
        rid, kind, dn = record["id"], record["kind"], record["dn"]
    except KeyError as exc:
        raise IdentityError(f"upsert record lacks {exc.args[0]!r}: {str(record)[:200]}") from None
    if not (isinstance(rid, str) and rid and isinstance(dn, str) and kind in ("user", "group")):
        raise IdentityError(f"upsert record needs string id and dn and kind user|group: "
                            f"{str(record)[:200]}")
    disabled = record.get("disabled")
    return (directory, rid, kind, dn, _db_json(record.get("attributes") or {}),
            _db_json(record.get("members")), None if disabled is None else int(bool(disabled)),
            _db_json(record.get("password_hashes")))


class IdentityStore:
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
        try:
            self.db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise sqlite_helpers.DatabaseUnusable(f"{self.path} cannot be read ({exc}); "
                                                  f"{RESTORE_HINT}") from None
        for suffix in ("-wal", "-shm"):  # SQLite creates them with the umask: tighten
            side = Path(str(self.path) + suffix)
            if side.exists():
                os.chmod(side, 0o600)

    @classmethod
    def open_existing(cls, path: Path) -> IdentityStore | None:
        """For read-only commands: None when no sync ever created the file."""
        return cls(path) if Path(path).exists() else None

    def check(self) -> None:
        """Refuse a damaged database (``serve`` calls this once at start)."""
        sqlite_helpers.quick_check(self.db, self.path, RESTORE_HINT)

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ writing

    def applied_through(self, directory: str, instance_id: str) -> int:
        row = self.db.execute("SELECT applied_through FROM applied WHERE directory = ? AND "
                              "instance_id = ?", (directory, instance_id)).fetchone()
        return row[0] if row else 0

    def apply_batch(self, directory: str, instance_id: str, entries: list[dict],
                    after: int | None = None) -> BatchResult:
        """Apply one ``directory.changes`` batch exactly once, in one transaction.

        ``entries`` is ``[{"seq": int, "message": dict}, ...]`` in increasing seq
        order (the caller validated the shape). ``after`` (a pipelined batch: the
        last seq of the batch the agent sent before it) must already be applied,
        else nothing is (``out_of_order``): applying it would skip that batch's
        changes for good. Raises :class:`IdentityError` (nothing applied) for a
        malformed message or record.
        """
        self.db.execute("BEGIN IMMEDIATE")
        try:
            through = self.applied_through(directory, instance_id)
            if after is not None and through < after:
                result = BatchResult(applied_through=through, out_of_order=True)
                result.notes.append(f"previous batch (through seq {after}) not applied yet")
            else:
                result = self._apply(directory, instance_id, entries)
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
                self._set_applied(directory, instance_id, through)
        return max(through, current)

    def _tx(self):
        return Transaction(self.db)

    def _set_applied(self, directory: str, instance_id: str, seq: int) -> None:
        self.db.execute("INSERT INTO applied VALUES (?, ?, ?, ?) ON CONFLICT (directory, "
                        "instance_id) DO UPDATE SET applied_through = excluded.applied_through, "
                        "updated_at = excluded.updated_at",
                        (directory, instance_id, seq, time.time()))

    def _state(self, directory: str) -> dict:
        self.db.execute("INSERT OR IGNORE INTO directories (directory) VALUES (?)", (directory,))
        return dict(self.db.execute("SELECT * FROM directories WHERE directory = ?",
                                    (directory,)).fetchone())

    def _apply(self, directory: str, instance_id: str, entries: list[dict]) -> BatchResult:
        through = self.applied_through(directory, instance_id)
        result = BatchResult(applied_through=through)
        state = self._state(directory)
        for entry in entries:
            seq = entry["seq"]
            if seq <= through:
                result.skipped += 1
                continue
            self._message(directory, instance_id, entry["message"], state, result)
            through = seq
            result.applied += 1
        if result.applied:
            self._set_applied(directory, instance_id, through)
            self.db.execute("UPDATE directories SET cursor = ?, stream_mode = ?, "
                            "stream_instance = ?, synced_at = ?, full_synced_at = ?, "
                            "last_change = ?, applied = applied + ? WHERE directory = ?",
                            (state["cursor"], state["stream_mode"], state["stream_instance"],
                             state["synced_at"], state["full_synced_at"],
                             time.time() if result.records or result.swapped
                             else state["last_change"], result.records, directory))
        result.applied_through = through
        return result

    def _message(self, directory: str, instance_id: str, message: dict, state: dict,
                 result: BatchResult) -> None:
        kind = message.get("type")
        owner = state["stream_instance"] == instance_id and state["stream_mode"] is not None
        if kind == "begin":
            mode = message.get("mode")
            if mode not in ("full", "incremental"):
                raise IdentityError(f"begin with mode {mode!r}; expected full or incremental")
            # Whatever stream was open is abandoned: its staged rows must never swap in.
            self.db.execute("DELETE FROM staging WHERE directory = ?", (directory,))
            state["stream_mode"], state["stream_instance"] = mode, instance_id
        elif kind == "chunk":
            changes = message.get("changes")
            if not isinstance(changes, list):
                raise IdentityError("chunk without a changes list")
            # A chunk of a stream whose begin home did not see (sent while this
            # instance was not the leader) holds whole states: apply it live.
            table = "staging" if owner and state["stream_mode"] == "full" else "entries"
            result.records += self._records(directory, table, changes)
        elif kind == "end":
            cursor = message.get("cursor")
            if cursor is not None and not isinstance(cursor, str):
                raise IdentityError("end with a cursor that is not a string")
            if not owner:
                result.resync_wanted = True
                result.notes.append("end without its begin: cursor not stored")
            else:
                if state["stream_mode"] == "full":
                    self._swap(directory)
                    result.swapped = True
                    state["full_synced_at"] = time.time()
                state["cursor"] = cursor
                state["synced_at"] = time.time()
                result.cursor = cursor
                self.db.execute("DELETE FROM directory_errors WHERE directory = ?", (directory,))
            state["stream_mode"] = state["stream_instance"] = None
        elif kind == "error":
            self._store_error(directory, instance_id, message)
        else:
            raise IdentityError(f"stream message type {kind!r}; expected begin, chunk, end or error")

    def _store_error(self, directory: str, instance_id: str, error: dict) -> None:
        """Keep `error` ({code, message, hint?, server?, at?}) as the directory's last error."""
        code, text, at = error.get("code"), error.get("message"), error.get("at")
        if not (isinstance(code, str) and code and isinstance(text, str)):
            raise IdentityError(f"error message needs string code and message: {str(error)[:200]}")
        if at is not None and (not isinstance(at, (int, float)) or isinstance(at, bool)):
            raise IdentityError(f"error message 'at' must be a unix time: {str(error)[:200]}")
        hint, server = error.get("hint"), error.get("server")
        self.db.execute("INSERT OR REPLACE INTO directory_errors VALUES (?,?,?,?,?,?,?,?)",
                        (directory, instance_id, code, text,
                         hint if isinstance(hint, str) else None,
                         server if isinstance(server, str) else None, at, time.time()))

    def record_error(self, directory: str, instance_id: str | None, error: dict) -> None:
        """Home's own finding (an instance refused ``sync``) as the directory's last error."""
        with self._tx():
            self._store_error(directory, instance_id, error)

    def last_error(self, directory: str) -> dict | None:
        """``{code, message, hint, server, at, instance, received_at}`` or None when syncing."""
        row = self.db.execute("SELECT * FROM directory_errors WHERE directory = ?",
                              (directory,)).fetchone()
        if row is None:
            return None
        out = {k: row[k] for k in ("code", "message", "hint", "server", "at", "received_at")}
        out["instance"] = row["instance_id"]
        return out

    def _records(self, directory: str, table: str, changes: list) -> int:
        """Write records in order; consecutive upserts (or deletes) go as one executemany."""
        run_op, run = None, []
        for record in changes:
            if not isinstance(record, dict):
                raise IdentityError(f"change record is not an object: {str(record)[:200]}")
            op = record.get("op")
            if op == "upsert":
                item = _row(directory, record)
            elif op == "delete":
                rid = record.get("id")
                if not isinstance(rid, str) or not rid:
                    raise IdentityError(f"delete record without an id: {str(record)[:200]}")
                item = (directory, rid)
            else:
                raise IdentityError(f"record op {op!r}; expected upsert or delete")
            if op != run_op and run:
                self._flush(table, run_op, run)
                run = []
            run_op = op
            run.append(item)
        if run:
            self._flush(table, run_op, run)
        return len(changes)

    def _flush(self, table: str, op: str, rows: list[tuple]) -> None:
        self.db.executemany(_UPSERT[table] if op == "upsert" else _DELETE[table], rows)

    def _swap(self, directory: str) -> None:
        """The full sync completed: staging becomes the snapshot (same transaction)."""
        self.db.execute("DELETE FROM entries WHERE directory = ?", (directory,))
        self.db.execute(f"INSERT INTO entries ({_COLUMNS}) SELECT {_COLUMNS} FROM staging "
                        "WHERE directory = ?", (directory,))
        self.db.execute("DELETE FROM staging WHERE directory = ?", (directory,))

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
        return state

    def entries(self, directory: str, kind: str | None = None) -> Iterator[dict]:
        """Live snapshot records (decoded), users then groups, by DN."""
        sql = "SELECT * FROM entries WHERE directory = ?"
        args: list = [directory]
        if kind:
            sql += " AND kind = ?"
            args.append(kind)
        for row in self.db.execute(sql + " ORDER BY kind DESC, dn", args):
            yield _decode(row)

    def entry(self, directory: str, rid: str) -> dict | None:
        row = self.db.execute("SELECT * FROM entries WHERE directory = ? AND id = ?",
                              (directory, rid)).fetchone()
        return _decode(row) if row else None

    def export_csv(self, directory: str, out: Path) -> dict:
        """Write the snapshot as CSV (format: :func:`csv_columns`), atomically."""
        rows = list(self.entries(directory))
        fields = sorted({f for r in rows for f in r["attributes"]})
        member_of: dict[str, list[str]] = {}
        for r in rows:
            if r["kind"] == "group":
                for dn in r["members"] or []:
                    member_of.setdefault(dn.lower(), []).append(r["dn"])
        out = Path(out)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # personal data
            with open(fd, "w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh)
                writer.writerow(csv_columns(fields))
                for r in rows:
                    writer.writerow(
                        [r["kind"], r["id"], r["dn"]]
                        + [_cell(r["attributes"].get(f)) for f in fields]
                        + [_cell(r["disabled"]),
                           _cell(sorted(member_of.get(r["dn"].lower(), []))),
                           _cell(r["members"] if r["kind"] == "group" else None)])
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        users = sum(1 for r in rows if r["kind"] == "user")
        return {"directory": directory, "out": str(out), "users": users,
                "groups": len(rows) - users, "fields": fields}


def csv_columns(fields: Iterable[str]) -> list[str]:
    """``kind,id,dn,<mapped attribute fields, sorted>,disabled,member_of,members``."""
    return ["kind", "id", "dn", *sorted(fields), "disabled", "member_of", "members"]


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return CSV_MULTI.join(_cell(v) for v in value)
    return str(value)


def _decode(row: sqlite3.Row) -> dict:
    disabled = row["disabled"]
    return {"kind": row["kind"], "id": row["id"], "dn": row["dn"],
            "attributes": json.loads(row["attributes"]),
            "members": json.loads(row["members"]) if row["members"] else None,
            "disabled": None if disabled is None else bool(disabled),
            "password_hashes": json.loads(row["password_hashes"])
            if row["password_hashes"] else None}
