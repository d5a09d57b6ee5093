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

import base64
import csv
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tether import protocol
from tether import dn as dnmeaning
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
-- parts of a stream message larger than a frame (tether.protocol.parts), kept until
-- its last part is applied; at most one set per (directory, instance).
CREATE TABLE IF NOT EXISTS parts (
    directory TEXT NOT NULL, instance_id TEXT NOT NULL, idx INTEGER NOT NULL,
    count INTEGER NOT NULL, size INTEGER NOT NULL, text TEXT NOT NULL,
    PRIMARY KEY (directory, instance_id, idx)
) WITHOUT ROWID;
-- membership as a relation: group id -> member (its DN's meaning, tether.dn.key, and
-- its DN as the directory spelled it, for display). The member's id is found by
-- joining entries on dn_key, so a group that arrives before its members, a rename
-- or a delete resolves by itself; a member naming nothing in the snapshot stays.
CREATE TABLE IF NOT EXISTS memberships (
    directory TEXT NOT NULL, group_id TEXT NOT NULL, member_key TEXT NOT NULL,
    member_dn TEXT NOT NULL, PRIMARY KEY (directory, group_id, member_key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS staging_memberships (
    directory TEXT NOT NULL, group_id TEXT NOT NULL, member_key TEXT NOT NULL,
    member_dn TEXT NOT NULL, PRIMARY KEY (directory, group_id, member_key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS memberships_member ON memberships (directory, member_key);

-- lookups of home's SCIM API (home/api/scim.py): userName / displayName eq as identity
-- providers send them; case-insensitive like SCIM's caseExact=false.
CREATE INDEX IF NOT EXISTS entries_username ON entries
    (directory, kind, lower(json_extract(attributes, '$.username')));
CREATE INDEX IF NOT EXISTS entries_name ON entries
    (directory, kind, lower(json_extract(attributes, '$.name')));
-- SCIM externalId: the provisioning client's own id for an entry (RFC 7643 §3.1). The
-- directory has no place for it, so home keeps it beside the entry.
CREATE TABLE IF NOT EXISTS external_ids (
    directory TEXT NOT NULL, id TEXT NOT NULL, external_id TEXT NOT NULL,
    PRIMARY KEY (directory, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS external_ids_value ON external_ids (directory, external_id);
CREATE TABLE IF NOT EXISTS applied (
    directory TEXT NOT NULL, instance_id TEXT NOT NULL,
    applied_through INTEGER NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (directory, instance_id)
);
"""

#: schema version 1 added dn_key, encodings, problems and the memberships tables
SCHEMA_VERSION = 1
_MIGRATE_1 = """
ALTER TABLE entries ADD COLUMN dn_key TEXT;
ALTER TABLE entries ADD COLUMN encodings TEXT;
ALTER TABLE entries ADD COLUMN problems TEXT;
ALTER TABLE staging ADD COLUMN dn_key TEXT;
ALTER TABLE staging ADD COLUMN encodings TEXT;
ALTER TABLE staging ADD COLUMN problems TEXT;
"""
_COLUMNS = ("directory, id, kind, dn, attributes, members, disabled, password_hashes, dn_key, "
            "encodings, problems")
_UPSERT = {t: f"INSERT OR REPLACE INTO {t} ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
           for t in ("entries", "staging")}
_MEMBERS = {"entries": "memberships", "staging": "staging_memberships"}
_BROKEN = "!"  # prefix of the key of a DN that does not parse: matches only its own spelling
_DELETE = {t: f"DELETE FROM {t} WHERE directory = ? AND id = ?" for t in ("entries", "staging")}
#: Malformed member DNs reported per group (the rest are counted by their keys).
MAX_MEMBER_PROBLEMS = 5
#: Paths per json_insert / json_remove call (SQLite's default limit of parameters is 32,766).
_JSON_PATHS = 400
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


def dn_key(dn: str) -> tuple[str, str | None]:
    """(the DN's comparison key, None) or, for a malformed DN, (its own key, why)."""
    try:
        return dnmeaning.key(dn), None
    except dnmeaning.DNError as exc:
        return _BROKEN + dn.lower(), str(exc)


def _row(directory: str, record: dict, known: dict[str, str] | None = None
         ) -> tuple[tuple, list[tuple]]:
    """An upsert record as (entry row, membership rows); missing mandatory fields refuse the batch.

    Problems found here (a malformed DN of the entry or of a member) join those
    the agent reported (``problems``) on the entry, for ``directory status``.
    """
    try:
        rid, kind, dn = record["id"], record["kind"], record["dn"]
    except KeyError as exc:
        raise IdentityError(f"upsert record lacks {exc.args[0]!r}: {str(record)[:200]}") from None
    if not (isinstance(rid, str) and rid and isinstance(dn, str) and kind in ("user", "group")):
        raise IdentityError(f"upsert record needs string id and dn and kind user|group: "
                            f"{str(record)[:200]}")
    problems = [p for p in record.get("problems") or [] if isinstance(p, dict)][:20]
    key, why = dn_key(dn)
    if why:
        problems.append({"code": "bad_dn", "message": f"the entry's own DN does not parse: {why}"})
    members = record.get("members")
    member_rows: list[tuple] = []
    if kind == "group" and isinstance(members, list):
        bad = 0
        for member in members:
            if not isinstance(member, str):
                raise IdentityError(f"group {rid} lists a member that is not a DN string")
            mkey = (known or {}).get(member)  # spelled as last time: no need to parse again
            why = None
            if mkey is None or mkey.startswith(_BROKEN):
                mkey, why = dn_key(member)
            if why:
                bad += 1
                if bad <= MAX_MEMBER_PROBLEMS:
                    problems.append(_bad_member(why))
            member_rows.append((directory, rid, mkey, member))
    disabled = record.get("disabled")
    encodings = record.get("encodings")
    return ((directory, rid, kind, dn, _db_json(record.get("attributes") or {}),
             _db_json(members), None if disabled is None else int(bool(disabled)),
             _db_json(record.get("password_hashes")), key,
             _db_json(encodings) if isinstance(encodings, dict) and encodings else None,
             _db_json(problems) if problems else None), member_rows)


def _bad_member(why: str) -> dict:
    return {"code": "bad_member_dn", "attribute": "member",
            "message": f"member value kept as written but names nothing: {why}"}


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
        self._migrate()
        for suffix in ("-wal", "-shm"):  # SQLite creates them with the umask: tighten
            side = Path(str(self.path) + suffix)
            if side.exists():
                os.chmod(side, 0o600)

    def _migrate(self) -> None:
        """Bring an older identity.db up to SCHEMA_VERSION in place (never a wipe).

        Version 0 -> 1: entries gain dn_key (computed from each DN), encodings and
        problems; memberships are filled from each group's stored member DNs.
        """
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version >= SCHEMA_VERSION:
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            columns = {r[1] for r in self.db.execute("PRAGMA table_info(entries)")}
            if "dn_key" not in columns:
                for statement in filter(str.strip, _MIGRATE_1.split(";")):
                    self.db.execute(statement)
            for table in ("entries", "staging"):
                rows = self.db.execute(f"SELECT * FROM {table}").fetchall()
                for row in rows:
                    record = _decode(row)
                    record["problems"] = None
                    entry, member_rows = _row(row["directory"], record)
                    self.db.execute(_UPSERT[table], entry)
                    self.db.execute(f"DELETE FROM {_MEMBERS[table]} WHERE directory = ? AND "
                                    "group_id = ?", (row["directory"], row["id"]))
                    self.db.executemany(f"INSERT OR REPLACE INTO {_MEMBERS[table]} VALUES "
                                        "(?,?,?,?)", member_rows)
            self.db.execute("CREATE INDEX IF NOT EXISTS entries_dn_key ON entries "
                            "(directory, dn_key)")
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

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

    def _part(self, directory: str, instance_id: str, message: dict, state: dict,
              result: BatchResult) -> None:
        """Keep one part; at the last one, apply the message the set carries.

        Why in the store: parts of one message span several batches, and each
        batch commits with its applied_through, so a part is kept exactly once.
        """
        try:
            part = protocol.Part.from_message(message)
        except protocol.ProtocolError as exc:
            raise IdentityError(exc.detail) from None
        if part.index == 0:
            self._drop_parts(directory, instance_id)
        held = self.db.execute("SELECT COUNT(*) FROM parts WHERE directory = ? AND instance_id = ?",
                               (directory, instance_id)).fetchone()[0]
        if held != part.index:
            raise IdentityError(f"part {part.index} of {part.count} arrived after {held} parts; "
                                "the agent must resend the message from its part 0")
        self.db.execute("INSERT INTO parts VALUES (?,?,?,?,?,?)",
                        (directory, instance_id, part.index, part.count, part.size, part.text))
        if not part.last:
            return
        rows = self.db.execute("SELECT idx, count, size, text FROM parts WHERE directory = ? AND "
                               "instance_id = ? ORDER BY idx", (directory, instance_id)).fetchall()
        self._drop_parts(directory, instance_id)
        try:
            whole = protocol.join_parts([protocol.Part(*row) for row in rows])
        except protocol.ProtocolError as exc:
            raise IdentityError(exc.detail) from None
        self._message(directory, instance_id, whole, state, result)

    def _drop_parts(self, directory: str, instance_id: str) -> None:
        self.db.execute("DELETE FROM parts WHERE directory = ? AND instance_id = ?",
                        (directory, instance_id))

    def _message(self, directory: str, instance_id: str, message: dict, state: dict,
                 result: BatchResult) -> None:
        try:
            checked = protocol.changes.decode(message)
        except protocol.ProtocolError as exc:
            raise IdentityError(exc.detail) from None
        if isinstance(checked, protocol.Part):
            self._part(directory, instance_id, message, state, result)
            return
        # any other message ends an unfinished set of parts: the agent replays from its cursor
        self._drop_parts(directory, instance_id)
        owner = state["stream_instance"] == instance_id and state["stream_mode"] is not None
        if isinstance(checked, protocol.changes.Begin):
            # Whatever stream was open is abandoned: its staged rows must never swap in.
            self.db.execute("DELETE FROM staging WHERE directory = ?", (directory,))
            self.db.execute("DELETE FROM staging_memberships WHERE directory = ?", (directory,))
            state["stream_mode"], state["stream_instance"] = checked.mode, instance_id
        elif isinstance(checked, protocol.changes.Chunk):
            # A chunk of a stream whose begin home did not see (sent while this
            # instance was not the leader) holds whole states: apply it live.
            table = "staging" if owner and state["stream_mode"] == "full" else "entries"
            result.records += self._records(directory, table, checked.changes, result)
        elif isinstance(checked, protocol.changes.End):
            if not owner:
                result.resync_wanted = True
                result.notes.append("end without its begin: cursor not stored")
            else:
                if state["stream_mode"] == "full":
                    self._swap(directory)
                    result.swapped = True
                    state["full_synced_at"] = time.time()
                state["cursor"] = checked.cursor
                state["synced_at"] = time.time()
                result.cursor = checked.cursor
                self.db.execute("DELETE FROM directory_errors WHERE directory = ?", (directory,))
            state["stream_mode"] = state["stream_instance"] = None
        else:
            self._store_error(directory, instance_id, checked)

    def _store_error(self, directory: str, instance_id: str,
                     error: protocol.changes.Error) -> None:
        """Keep ``error`` (checked by the protocol) as the directory's last error."""
        self.db.execute("INSERT OR REPLACE INTO directory_errors VALUES (?,?,?,?,?,?,?,?)",
                        (directory, instance_id, error.code, error.message, error.hint,
                         error.server, error.at, time.time()))

    def record_error(self, directory: str, instance_id: str | None, error: dict) -> None:
        """Home's own finding (an instance refused ``sync``) as the directory's last error."""
        try:
            checked = protocol.changes.decode({**error, "type": "error"})
        except protocol.ProtocolError as exc:
            raise IdentityError(exc.detail) from None
        with self._tx():
            self._store_error(directory, instance_id, checked)

    def last_error(self, directory: str) -> dict | None:
        """``{code, message, hint, server, at, instance, received_at}`` or None when syncing."""
        row = self.db.execute("SELECT * FROM directory_errors WHERE directory = ?",
                              (directory,)).fetchone()
        if row is None:
            return None
        out = {k: row[k] for k in ("code", "message", "hint", "server", "at", "received_at")}
        out["instance"] = row["instance_id"]
        return out

    def _records(self, directory: str, table: str, changes: list,
                 result: BatchResult | None = None) -> int:
        """Write records in order; consecutive upserts (or deletes) go as one executemany."""
        run_op, run = None, []
        for record in changes:
            if not isinstance(record, dict):
                raise IdentityError(f"change record is not an object: {str(record)[:200]}")
            op = record.get("op")
            if op == protocol.MEMBER_DELTA_OP:
                if run:
                    self._flush(table, run_op, run)
                run_op, run = None, []
                why = self._member_delta(directory, table, record)
                if why and result is not None:
                    result.resync_wanted = True
                    result.notes.append(why)
                continue
            if op == "upsert":
                known = None
                if record.get("kind") == "group" and isinstance(record.get("id"), str):
                    known = dict(self.db.execute(
                        f"SELECT member_dn, member_key FROM {_MEMBERS[table]} WHERE directory = ? "
                        "AND group_id = ?", (directory, record["id"])).fetchall())
                item = (*_row(directory, record, known), known)
            elif op == "delete":
                rid = record.get("id")
                if not isinstance(rid, str) or not rid:
                    raise IdentityError(f"delete record without an id: {str(record)[:200]}")
                item = ((directory, rid), [], None)
            else:
                raise IdentityError(f"record op {op!r}; expected upsert, delete or "
                                    f"{protocol.MEMBER_DELTA_OP}")
            if op != run_op and run:
                self._flush(table, run_op, run)
                run = []
            run_op = op
            run.append(item)
        if run:
            self._flush(table, run_op, run)
        return len(changes)

    def _flush(self, table: str, op: str, items: list[tuple]) -> None:
        """Entries and their memberships (a record is a whole state: its old members go).

        Items are (entry row, membership rows, the group's stored {member DN: key} or
        None). Why the diff: one member added to a 100,000-member group rewrites one
        membership row, not all of them.
        """
        members = _MEMBERS[table]
        fresh = [(row[0], row[1]) for row, _, known in items if not known]
        self.db.executemany(f"DELETE FROM {members} WHERE directory = ? AND group_id = ?", fresh)
        if op != "upsert":
            self.db.executemany(_DELETE[table], [row for row, _, _ in items])
            return
        self.db.executemany(_UPSERT[table], [row for row, _, _ in items])
        inserts, deletes = [], []
        for row, rows, known in items:
            if not known:
                inserts += rows
                continue
            keep = {m[2] for m in rows}
            deletes += [(row[0], row[1], k) for k in set(known.values()) - keep]
            inserts += [m for m in rows if known.get(m[3]) != m[2]]
        self.db.executemany(f"DELETE FROM {members} WHERE directory = ? AND group_id = ? "
                            "AND member_key = ?", deletes)
        self.db.executemany(f"INSERT OR REPLACE INTO {members} VALUES (?,?,?,?)", inserts)

    def _member_delta(self, directory: str, table: str, record: dict) -> str | None:
        """Apply a member delta (tether.protocol.records); None, or why it was not applied.

        Why checked this strictly: a delta is right only on top of the very member
        list it was made from. The stored list must hold ``base_count`` values, every
        removed DN and none of the added ones (by meaning); otherwise nothing of the
        record is applied and the caller asks the leader for a full sync. Why in
        SQL: the stored list of a 100,000-member group is never loaded into Python.
        """
        try:
            base, add, remove = protocol.check_member_delta(record)
        except protocol.ProtocolError as exc:
            raise IdentityError(f"{exc.detail}: {str(record)[:200]}") from None
        rid, dn = record.get("id"), record.get("dn")
        if not (isinstance(rid, str) and rid and isinstance(dn, str)):
            raise IdentityError(f"member delta needs string id and dn: {str(record)[:200]}")
        row = self.db.execute(f"SELECT kind, json_array_length(members) FROM {table} WHERE "
                              "directory = ? AND id = ?", (directory, rid)).fetchone()
        if row is None or row[0] != "group":
            return (f"member delta of group {dn!r}, which home does not hold: a full sync "
                    "rebuilds it")
        members = _MEMBERS[table]
        where = f"FROM {members} WHERE directory = ? AND group_id = ? AND member_key = ?"
        gone = [dn_key(m)[0] for m in remove]
        joining = [(directory, rid, dn_key(m)[0], m) for m in add]
        held = {k for k in gone + [j[2] for j in joining]
                if self.db.execute(f"SELECT 1 {where}", (directory, rid, k)).fetchone()}
        before = (row[1] == base and held == set(gone) and len({j[2] for j in joining}) == len(add))
        # already applied (home wrote the provisioned read-back, or a repeated record)
        after = (row[1] == base + len(add) - len(remove) and held == {j[2] for j in joining})
        if not before and not after:
            return (f"member delta of group {dn!r} made for {base} members does not fit the "
                    f"{row[1]} home holds: a full sync rebuilds it")
        target = "WHERE directory = ? AND id = ?"
        if before and remove:
            found = [r[0] for r in self.db.execute(
                f"SELECT key FROM json_each((SELECT members FROM {table} {target})) "
                "WHERE value IN (SELECT value FROM json_each(?))",
                (directory, rid, json.dumps(remove)))]
            if len(found) != len(remove):
                return (f"member delta of group {dn!r} removes DNs spelled differently in home's "
                        "list: a full sync rebuilds it")
            found.sort(reverse=True)  # later indexes first: earlier ones do not move
            for i in range(0, len(found), _JSON_PATHS):
                paths = [f"$[{k}]" for k in found[i:i + _JSON_PATHS]]
                self.db.execute(f"UPDATE {table} SET members = json_remove(members"
                                f"{', ?' * len(paths)}) {target}", (*paths, directory, rid))
        for i in range(0, len(add) if before else 0, _JSON_PATHS):
            values = add[i:i + _JSON_PATHS]
            args = [x for v in values for x in ("$[#]", v)]
            self.db.execute(f"UPDATE {table} SET members = json_insert(members"
                            f"{', ?, ?' * len(values)}) {target}", (*args, directory, rid))
        if before:
            self.db.executemany(f"DELETE {where}", [(directory, rid, k) for k in gone])
            self.db.executemany(f"INSERT INTO {members} VALUES (?,?,?,?)", joining)
        # the entry's own columns are whole states, as in an upsert
        problems = [p for p in record.get("problems") or [] if isinstance(p, dict)][:20]
        key, why = dn_key(dn)
        if why:
            problems.append({"code": "bad_dn", "message": f"the entry's own DN does not parse: {why}"})
        broken = self.db.execute(
            f"SELECT member_dn FROM {members} WHERE directory = ? AND group_id = ? AND "
            "member_key >= ? AND member_key < ? LIMIT ?",
            (directory, rid, _BROKEN, chr(ord(_BROKEN) + 1), MAX_MEMBER_PROBLEMS)).fetchall()
        problems += [_bad_member(dn_key(r[0])[1] or "malformed DN") for r in broken]
        encodings = record.get("encodings")
        self.db.execute(
            f"UPDATE {table} SET dn = ?, dn_key = ?, attributes = ?, password_hashes = ?, "
            f"encodings = ?, problems = ? {target}",
            (dn, key, _db_json(record.get("attributes") or {}),
             _db_json(record.get("password_hashes")),
             _db_json(encodings) if isinstance(encodings, dict) and encodings else None,
             _db_json(problems) if problems else None, directory, rid))
        return None

    def _swap(self, directory: str) -> None:
        """The full sync completed: staging becomes the snapshot (same transaction)."""
        self.db.execute("DELETE FROM entries WHERE directory = ?", (directory,))
        self.db.execute(f"INSERT INTO entries ({_COLUMNS}) SELECT {_COLUMNS} FROM staging "
                        "WHERE directory = ?", (directory,))
        self.db.execute("DELETE FROM staging WHERE directory = ?", (directory,))
        self.db.execute("DELETE FROM memberships WHERE directory = ?", (directory,))
        self.db.execute("INSERT INTO memberships SELECT * FROM staging_memberships "
                        "WHERE directory = ?", (directory,))
        self.db.execute("DELETE FROM staging_memberships WHERE directory = ?", (directory,))

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
            yield _decode(row)

    def entry(self, directory: str, rid: str) -> dict | None:
        row = self.db.execute("SELECT * FROM entries WHERE directory = ? AND id = ?",
                              (directory, rid)).fetchone()
        return _decode(row) if row else None

    # ---- membership (the interface the SCIM Groups API reads)

    def members_of(self, directory: str, group_id: str) -> list[dict]:
        """``[{"id": member id or None, "dn", "kind"}]`` of a group, by DN; ``id`` None:
        the DN names nothing in the snapshot (outside the synced bases, or gone)."""
        return [dict(r) for r in self.db.execute(
            "SELECT e.id AS id, m.member_dn AS dn, e.kind AS kind FROM memberships m "
            "LEFT JOIN entries e ON e.directory = m.directory AND e.dn_key = m.member_key "
            "WHERE m.directory = ? AND m.group_id = ? ORDER BY m.member_key",
            (directory, group_id))]

    def groups_of(self, directory: str, entry_id: str) -> list[dict]:
        """``[{"id", "dn"}]`` of the groups listing the entry ``entry_id`` directly, by DN."""
        return [dict(r) for r in self.db.execute(
            "SELECT g.id AS id, g.dn AS dn FROM entries e "
            "JOIN memberships m ON m.directory = e.directory AND m.member_key = e.dn_key "
            "JOIN entries g ON g.directory = m.directory AND g.id = m.group_id "
            "WHERE e.directory = ? AND e.id = ? ORDER BY g.dn_key", (directory, entry_id))]

    def _group_dns(self, directory: str) -> dict[str, str]:
        """group id -> DN, read once: joining each membership row to its group's entry
        would read the group's whole row (its member list) once per member."""
        return dict(self.db.execute("SELECT id, dn FROM entries WHERE directory = ? AND "
                                    "kind = 'group'", (directory,)).fetchall())

    def _member_of_all(self, directory: str) -> dict[str, list[str]]:
        """entry id -> DNs of the groups listing it (one query, for the export)."""
        groups = self._group_dns(directory)
        out: dict[str, list[str]] = {}
        for rid, gid in self.db.execute(
                "SELECT e.id, m.group_id FROM memberships m "
                "JOIN entries e ON e.directory = m.directory AND e.dn_key = m.member_key "
                "WHERE m.directory = ?", (directory,)):
            if gid in groups:
                out.setdefault(rid, []).append(groups[gid])
        return out

    def unresolved_members(self, directory: str, limit: int = 20) -> dict:
        """Member DNs that name no entry of the snapshot: kept, and counted here."""
        sql = ("FROM memberships m "
               "LEFT JOIN entries e ON e.directory = m.directory AND e.dn_key = m.member_key "
               "WHERE m.directory = ? AND e.id IS NULL")
        count = self.db.execute("SELECT COUNT(*) " + sql, (directory,)).fetchone()[0]
        groups = self._group_dns(directory) if count else {}
        examples = [{"group_id": r[0], "group": groups.get(r[0], ""), "member": r[1]}
                    for r in self.db.execute("SELECT m.group_id, m.member_dn " + sql +
                                             " ORDER BY m.group_id, m.member_key LIMIT ?",
                                             (directory, limit))]
        return {"count": count, "examples": examples}

    def member_loops(self, directory: str, limit: int = 20) -> list[list[dict]]:
        """Cycles of group nesting (A in B in A), each as the groups ``[{"id", "dn"}]`` around it.

        Why report: nested evaluation by a consumer must not loop, and a cycle is
        usually a mistake in the directory; the groups still sync as they are.
        """
        edges: dict[str, list[str]] = {}
        names: dict[str, str] = {}
        groups = self._group_dns(directory)
        for gid, mid in self.db.execute(
                "SELECT m.group_id, e.id FROM memberships m "
                "JOIN entries e ON e.directory = m.directory AND e.dn_key = m.member_key "
                "WHERE m.directory = ? AND e.kind = 'group'", (directory,)):
            edges.setdefault(gid, []).append(mid)
            names[gid], names[mid] = groups.get(gid, ""), groups.get(mid, "")
        loops, done, seen_cycles = [], set(), set()
        for start in sorted(edges):
            if start in done:
                continue
            stack, path, on_path = [(start, iter(edges.get(start, ())))], [start], {start}
            while stack and len(loops) < limit:
                node, children = stack[-1]
                child = next(children, None)
                if child is None:
                    stack.pop()
                    path.pop()
                    on_path.discard(node)
                    done.add(node)
                elif child in on_path:
                    cycle = path[path.index(child):]
                    marker = frozenset(cycle)
                    if marker not in seen_cycles:
                        seen_cycles.add(marker)
                        loops.append([{"id": g, "dn": names[g]} for g in cycle])
                elif child not in done:
                    stack.append((child, iter(edges.get(child, ()))))
                    path.append(child)
                    on_path.add(child)
        return loops

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
        return [_decode(r) for r in rows]

    def member_entries(self, directory: str, group_id: str) -> list[dict]:
        """A group's members that name an entry of the snapshot, as ``{id, kind, name}``
        (``name``: a group's name or a user's username), through the membership relation,
        so DNs match by meaning (:mod:`tether.dn`)."""
        return [{"id": r[0], "kind": r[1], "name": r[2]} for r in self.db.execute(
            "SELECT e.id, e.kind, COALESCE(json_extract(e.attributes, '$.name'), "
            "json_extract(e.attributes, '$.username')) FROM memberships m "
            "JOIN entries e ON e.directory = m.directory AND e.dn_key = m.member_key "
            "WHERE m.directory = ? AND m.group_id = ? ORDER BY m.member_key",
            (directory, group_id))]

    def count_kind(self, directory: str, kind: str) -> int:
        return self.db.execute("SELECT COUNT(*) FROM entries WHERE directory = ? AND kind = ?",
                               (directory, kind)).fetchone()[0]

    def page(self, directory: str, kind: str, offset: int, limit: int) -> list[dict]:
        """Records of one kind in id order, ``limit`` from ``offset`` (0-based)."""
        rows = self.db.execute("SELECT * FROM entries WHERE directory = ? AND kind = ? "
                               "ORDER BY id LIMIT ? OFFSET ?", (directory, kind, limit, offset))
        return [_decode(r) for r in rows]

    def after(self, directory: str, kind: str, after_id: str, limit: int) -> list[dict]:
        """Records of one kind with id above ``after_id``, in id order (a resumable scan)."""
        rows = self.db.execute("SELECT * FROM entries WHERE directory = ? AND kind = ? AND id > ? "
                               "ORDER BY id LIMIT ?", (directory, kind, after_id, limit))
        return [_decode(r) for r in rows]

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
        return [_decode(r) for r in rows]

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
            self._records(directory, "entries", [record])
            if self._staging_open(directory):
                self._records(directory, "staging", [record])

    def drop_provisioned(self, directory: str, rid: str) -> None:
        """Forget an entry a provisioning order deleted (and its externalId)."""
        with self._tx():
            for table in ("entries", "staging"):
                self._records(directory, table, [{"op": "delete", "id": rid}])
            self.db.execute("DELETE FROM external_ids WHERE directory = ? AND id = ?",
                            (directory, rid))

    def _staging_open(self, directory: str) -> bool:
        return self.db.execute("SELECT 1 FROM staging WHERE directory = ? LIMIT 1",
                               (directory,)).fetchone() is not None

    def export_csv(self, directory: str, out: Path) -> dict:
        """Write the snapshot as CSV (format: :func:`csv_columns`), atomically."""
        rows = list(self.entries(directory))
        fields = sorted({f for r in rows for f in r["attributes"]})
        base64_fields = {f for r in rows for f, enc in (r["encodings"] or {}).items()
                         if enc == "base64"}
        member_of = self._member_of_all(directory)
        out = Path(out)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # personal data
            with open(fd, "w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh)
                writer.writerow(csv_columns(fields, base64_fields))
                for r in rows:
                    writer.writerow(
                        [r["kind"], r["id"], r["dn"]]
                        + [_cell(_as_column(r, f, f in base64_fields)) for f in fields]
                        + [_cell(r["disabled"]),
                           _cell(sorted(member_of.get(r["id"], []), key=_sort_key)),
                           _cell(r["members"] if r["kind"] == "group" else None)])
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        users = sum(1 for r in rows if r["kind"] == "user")
        return {"directory": directory, "out": str(out), "users": users,
                "groups": len(rows) - users, "fields": fields}


def _as_column(row: dict, field: str, base64_column: bool):
    """A field's value as its column says: in a ``;base64`` column, a row whose value is
    text (the field is base64 only in other rows, e.g. ``binary_in_text``) is base64 too."""
    value = row["attributes"].get(field)
    if not base64_column or value is None or (row["encodings"] or {}).get(field) == "base64":
        return value
    encode = lambda v: base64.b64encode(v.encode()).decode() if isinstance(v, str) else v  # noqa: E731
    return [encode(v) for v in value] if isinstance(value, list) else encode(value)


def _sort_key(dn: str) -> str:
    return dn_key(dn)[0]


def csv_columns(fields: Iterable[str], base64_fields: Iterable[str] = ()) -> list[str]:
    """``kind,id,dn,<mapped attribute fields, sorted>,disabled,member_of,members``; a field
    whose values are base64 (binary attributes) is headed ``<field>;base64``."""
    binary = set(base64_fields)
    return ["kind", "id", "dn", *(f"{f};base64" if f in binary else f for f in sorted(fields)),
            "disabled", "member_of", "members"]


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
            if row["password_hashes"] else None,
            "encodings": _json_column(row, "encodings"), "problems": _json_column(row, "problems")}


def _json_column(row: sqlite3.Row, name: str):
    """A JSON column that files older than SCHEMA_VERSION 1 lack (read during the migration)."""
    return json.loads(row[name]) if name in row.keys() and row[name] else None
