"""Rows of the directory store: what a stream record becomes, and back.

Why apart from the SQL: the checks of a record (mandatory fields, a DN that
does not parse, malformed member DNs) and its encoding as columns are the
same whatever engine keeps them; the write path (:mod:`.apply`) and the
reads (:mod:`.store`) both use them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from tether import dn as dnmeaning

BROKEN = "!"  # prefix of the key of a DN that does not parse: matches only its own spelling
#: Malformed member DNs reported per group (the rest are counted by their keys).
MAX_MEMBER_PROBLEMS = 5


class DirectoryStoreError(ValueError):
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


#: one encoder for every column: ``json.dumps`` with options builds a new one per call
_JSON = json.JSONEncoder(separators=(",", ":"), sort_keys=True)


def db_json(value) -> str | None:
    return None if value is None else _JSON.encode(value)


def dn_key(dn: str) -> tuple[str, str | None]:
    """(the DN's comparison key, None) or, for a malformed DN, (its own key, why)."""
    try:
        return dnmeaning.key(dn), None
    except dnmeaning.DNError as exc:
        return BROKEN + dn.lower(), str(exc)


def encode_record(directory: str, record: dict, known: dict[str, str] | None = None
                  ) -> tuple[tuple, list[tuple]]:
    """An upsert record as (entry row, membership rows); missing mandatory fields refuse the batch.

    Problems found here (a malformed DN of the entry or of a member) join those
    the agent reported (``problems``) on the entry, for ``directory status``.
    """
    try:
        rid, kind, dn = record["id"], record["kind"], record["dn"]
    except KeyError as exc:
        raise DirectoryStoreError(f"upsert record lacks {exc.args[0]!r}: "
                                  f"{str(record)[:200]}") from None
    if not (isinstance(rid, str) and rid and isinstance(dn, str) and kind in ("user", "group")):
        raise DirectoryStoreError(f"upsert record needs string id and dn and kind user|group: "
                                  f"{str(record)[:200]}")
    problems = [p for p in record.get("problems") or [] if isinstance(p, dict)][:20]
    key, why = dn_key(dn)
    if why:
        problems.append({"code": "bad_dn", "message": f"the entry's own DN does not parse: {why}"})
    members = record.get("members")
    member_rows: list[tuple] = []
    if kind == "group" and isinstance(members, list):
        bad = 0
        known = known or {}
        for member in members:
            if not isinstance(member, str):
                raise DirectoryStoreError(f"group {rid} lists a member that is not a DN string")
            mkey = known.get(member)  # spelled as last time: no need to parse again
            why = None
            if mkey is None or mkey.startswith(BROKEN):
                mkey, why = dn_key(member)
            if why:
                bad += 1
                if bad <= MAX_MEMBER_PROBLEMS:
                    problems.append(bad_member(why))
            member_rows.append((directory, rid, mkey, member))
    disabled = record.get("disabled")
    encodings = record.get("encodings")
    return ((directory, rid, kind, dn, db_json(record.get("attributes") or {}),
             db_json(members), None if disabled is None else int(bool(disabled)),
             db_json(record.get("password_hashes")), key,
             db_json(encodings) if isinstance(encodings, dict) and encodings else None,
             db_json(problems) if problems else None), member_rows)


def bad_member(why: str) -> dict:
    return {"code": "bad_member_dn", "attribute": "member",
            "message": f"member value kept as written but names nothing: {why}"}


def decode_row(row) -> dict:
    """A stored entry row (any mapping by column name) as the record the readers get."""
    disabled = row["disabled"]
    return {"kind": row["kind"], "id": row["id"], "dn": row["dn"],
            "attributes": json.loads(row["attributes"]),
            "members": json.loads(row["members"]) if row["members"] else None,
            "disabled": None if disabled is None else bool(disabled),
            "password_hashes": json.loads(row["password_hashes"])
            if row["password_hashes"] else None,
            "encodings": _json_column(row, "encodings"), "problems": _json_column(row, "problems")}


def _json_column(row, name: str):
    """A JSON column that files older than SCHEMA_VERSION 1 lack (read during the migration)."""
    return json.loads(row[name]) if name in row.keys() and row[name] else None
