"""The write path of the directory store: one batch of stream messages, applied.

:class:`ChangeWriter` turns the agent's engine messages (begin, chunk, end,
error, and parts of a message larger than a frame) into rows, inside the
transaction the caller (:meth:`DirectoryStore.apply_batch
<tether.home.directorystore.store.DirectoryStore.apply_batch>`) opened, so a
batch and its ``applied_through`` commit together or not at all.
"""

from __future__ import annotations

import sqlite3
import time

from tether import protocol
from tether.home.directorystore.members import apply_member_delta
from tether.home.directorystore.records import BatchResult, DirectoryStoreError, encode_record
from tether.home.directorystore.schema import COLUMNS, DELETE, MEMBERS, UPSERT


class ChangeWriter:
    """Writes stream messages and records into ``identity.db`` (no transactions of its own)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def applied_through(self, directory: str, instance_id: str) -> int:
        row = self.db.execute("SELECT applied_through FROM applied WHERE directory = ? AND "
                              "instance_id = ?", (directory, instance_id)).fetchone()
        return row[0] if row else 0

    def set_applied(self, directory: str, instance_id: str, seq: int) -> None:
        self.db.execute("INSERT INTO applied VALUES (?, ?, ?, ?) ON CONFLICT (directory, "
                        "instance_id) DO UPDATE SET applied_through = excluded.applied_through, "
                        "updated_at = excluded.updated_at",
                        (directory, instance_id, seq, time.time()))

    def _state(self, directory: str) -> dict:
        self.db.execute("INSERT OR IGNORE INTO directories (directory) VALUES (?)", (directory,))
        return dict(self.db.execute("SELECT * FROM directories WHERE directory = ?",
                                    (directory,)).fetchone())

    def apply(self, directory: str, instance_id: str, entries: list[dict]) -> BatchResult:
        """Apply the entries above the instance's ``applied_through`` (the caller's
        transaction commits them together with the new ``applied_through``)."""
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
            self.set_applied(directory, instance_id, through)
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
            raise DirectoryStoreError(exc.detail) from None
        if part.index == 0:
            self._drop_parts(directory, instance_id)
        held = self.db.execute("SELECT COUNT(*) FROM parts WHERE directory = ? AND instance_id = ?",
                               (directory, instance_id)).fetchone()[0]
        if held != part.index:
            raise DirectoryStoreError(f"part {part.index} of {part.count} arrived after {held} parts; "
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
            raise DirectoryStoreError(exc.detail) from None
        self._message(directory, instance_id, whole, state, result)

    def _drop_parts(self, directory: str, instance_id: str) -> None:
        self.db.execute("DELETE FROM parts WHERE directory = ? AND instance_id = ?",
                        (directory, instance_id))

    def _message(self, directory: str, instance_id: str, message: dict, state: dict,
                 result: BatchResult) -> None:
        try:
            checked = protocol.changes.decode(message)
        except protocol.ProtocolError as exc:
            raise DirectoryStoreError(exc.detail) from None
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
            result.records += self.records(directory, table, checked.changes, result)
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
            self.store_error(directory, instance_id, checked)

    def store_error(self, directory: str, instance_id: str | None,
                    error: protocol.changes.Error) -> None:
        """Keep ``error`` (checked by the protocol) as the directory's last error."""
        self.db.execute("INSERT OR REPLACE INTO directory_errors VALUES (?,?,?,?,?,?,?,?)",
                        (directory, instance_id, error.code, error.message, error.hint,
                         error.server, error.at, time.time()))

    def records(self, directory: str, table: str, changes: list,
                 result: BatchResult | None = None) -> int:
        """Write records in order; consecutive upserts (or deletes) go as one executemany."""
        run_op, run = None, []
        for record in changes:
            if not isinstance(record, dict):
                raise DirectoryStoreError(f"change record is not an object: {str(record)[:200]}")
            op = record.get("op")
            if op == protocol.MEMBER_DELTA_OP:
                if run:
                    self._flush(table, run_op, run)
                run_op, run = None, []
                why = apply_member_delta(self.db, directory, table, record)
                if why and result is not None:
                    result.resync_wanted = True
                    result.notes.append(why)
                continue
            if op == "upsert":
                known = None
                if record.get("kind") == "group" and isinstance(record.get("id"), str):
                    known = dict(self.db.execute(
                        f"SELECT member_dn, member_key FROM {MEMBERS[table]} WHERE directory = ? "
                        "AND group_id = ?", (directory, record["id"])).fetchall())
                item = (*encode_record(directory, record, known), known)
            elif op == "delete":
                rid = record.get("id")
                if not isinstance(rid, str) or not rid:
                    raise DirectoryStoreError(f"delete record without an id: {str(record)[:200]}")
                item = ((directory, rid), [], None)
            else:
                raise DirectoryStoreError(f"record op {op!r}; expected upsert, delete or "
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
        members = MEMBERS[table]
        fresh = [(row[0], row[1]) for row, _, known in items if not known]
        self.db.executemany(f"DELETE FROM {members} WHERE directory = ? AND group_id = ?", fresh)
        if op != "upsert":
            self.db.executemany(DELETE[table], [row for row, _, _ in items])
            return
        self.db.executemany(UPSERT[table], [row for row, _, _ in items])
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

    def _swap(self, directory: str) -> None:
        """The full sync completed: staging becomes the snapshot (same transaction)."""
        self.db.execute("DELETE FROM entries WHERE directory = ?", (directory,))
        self.db.execute(f"INSERT INTO entries ({COLUMNS}) SELECT {COLUMNS} FROM staging "
                        "WHERE directory = ?", (directory,))
        self.db.execute("DELETE FROM staging WHERE directory = ?", (directory,))
        self.db.execute("DELETE FROM memberships WHERE directory = ?", (directory,))
        self.db.execute("INSERT INTO memberships SELECT * FROM staging_memberships "
                        "WHERE directory = ?", (directory,))
        self.db.execute("DELETE FROM staging_memberships WHERE directory = ?", (directory,))

