"""Group membership in the directory store: member deltas and the membership reads.

Membership is a relation (``memberships``: group id -> the member DN's meaning,
:func:`tether.dn.key`, and its spelling), joined to entries by ``dn_key``, so
a group that arrives before its members, a rename or a delete resolves by
itself. These functions take the open connection of :class:`DirectoryStore
<tether.home.directorystore.store.DirectoryStore>`; the member delta runs
inside the transaction of the batch that carries it.
"""

from __future__ import annotations

import json
import sqlite3

from tether import protocol
from tether.home.directorystore.records import (BROKEN, MAX_MEMBER_PROBLEMS, DirectoryStoreError,
                                                bad_member, db_json, dn_key)
from tether.home.directorystore.schema import MEMBERS

#: Paths per json_insert / json_remove call (SQLite's default limit of parameters is 32,766).
JSON_PATHS = 400


def apply_member_delta(db: sqlite3.Connection, directory: str, table: str, record: dict) -> str | None:
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
        raise DirectoryStoreError(f"{exc.detail}: {str(record)[:200]}") from None
    rid, dn = record.get("id"), record.get("dn")
    if not (isinstance(rid, str) and rid and isinstance(dn, str)):
        raise DirectoryStoreError(f"member delta needs string id and dn: {str(record)[:200]}")
    row = db.execute(f"SELECT kind, json_array_length(members) FROM {table} WHERE "
                     "directory = ? AND id = ?", (directory, rid)).fetchone()
    if row is None or row[0] != "group":
        return (f"member delta of group {dn!r}, which home does not hold: a full sync "
                "rebuilds it")
    members = MEMBERS[table]
    where = f"FROM {members} WHERE directory = ? AND group_id = ? AND member_key = ?"
    gone = [dn_key(m)[0] for m in remove]
    joining = [(directory, rid, dn_key(m)[0], m) for m in add]
    held = {k for k in gone + [j[2] for j in joining]
            if db.execute(f"SELECT 1 {where}", (directory, rid, k)).fetchone()}
    before = (row[1] == base and held == set(gone) and len({j[2] for j in joining}) == len(add))
    # already applied (home wrote the provisioned read-back, or a repeated record)
    after = (row[1] == base + len(add) - len(remove) and held == {j[2] for j in joining})
    if not before and not after:
        return (f"member delta of group {dn!r} made for {base} members does not fit the "
                f"{row[1]} home holds: a full sync rebuilds it")
    target = "WHERE directory = ? AND id = ?"
    if before and remove:
        found = [r[0] for r in db.execute(
            f"SELECT key FROM json_each((SELECT members FROM {table} {target})) "
            "WHERE value IN (SELECT value FROM json_each(?))",
            (directory, rid, json.dumps(remove)))]
        if len(found) != len(remove):
            return (f"member delta of group {dn!r} removes DNs spelled differently in home's "
                    "list: a full sync rebuilds it")
        found.sort(reverse=True)  # later indexes first: earlier ones do not move
        for i in range(0, len(found), JSON_PATHS):
            paths = [f"$[{k}]" for k in found[i:i + JSON_PATHS]]
            db.execute(f"UPDATE {table} SET members = json_remove(members"
                       f"{', ?' * len(paths)}) {target}", (*paths, directory, rid))
    for i in range(0, len(add) if before else 0, JSON_PATHS):
        values = add[i:i + JSON_PATHS]
        args = [x for v in values for x in ("$[#]", v)]
        db.execute(f"UPDATE {table} SET members = json_insert(members"
                   f"{', ?, ?' * len(values)}) {target}", (*args, directory, rid))
    if before:
        db.executemany(f"DELETE {where}", [(directory, rid, k) for k in gone])
        db.executemany(f"INSERT INTO {members} VALUES (?,?,?,?)", joining)
    # the entry's own columns are whole states, as in an upsert
    problems = [p for p in record.get("problems") or [] if isinstance(p, dict)][:20]
    key, why = dn_key(dn)
    if why:
        problems.append({"code": "bad_dn", "message": f"the entry's own DN does not parse: {why}"})
    broken = db.execute(
        f"SELECT member_dn FROM {members} WHERE directory = ? AND group_id = ? AND "
        "member_key >= ? AND member_key < ? LIMIT ?",
        (directory, rid, BROKEN, chr(ord(BROKEN) + 1), MAX_MEMBER_PROBLEMS)).fetchall()
    problems += [bad_member(dn_key(r[0])[1] or "malformed DN") for r in broken]
    encodings = record.get("encodings")
    db.execute(
        f"UPDATE {table} SET dn = ?, dn_key = ?, attributes = ?, password_hashes = ?, "
        f"encodings = ?, problems = ? {target}",
        (dn, key, db_json(record.get("attributes") or {}),
         db_json(record.get("password_hashes")),
         db_json(encodings) if isinstance(encodings, dict) and encodings else None,
         db_json(problems) if problems else None, directory, rid))
    return None


def members_of(db: sqlite3.Connection, directory: str, group_id: str) -> list[dict]:
    """``[{"id": member id or None, "dn", "kind"}]`` of a group, by DN; ``id`` None:
    the DN names nothing in the snapshot (outside the synced bases, or gone)."""
    return [dict(r) for r in db.execute(
        "SELECT e.id AS id, m.member_dn AS dn, e.kind AS kind FROM memberships m "
        "LEFT JOIN entries e ON e.directory = m.directory AND e.dn_key = m.member_key "
        "WHERE m.directory = ? AND m.group_id = ? ORDER BY m.member_key",
        (directory, group_id))]


def groups_of(db: sqlite3.Connection, directory: str, entry_id: str) -> list[dict]:
    """``[{"id", "dn"}]`` of the groups listing the entry ``entry_id`` directly, by DN."""
    return [dict(r) for r in db.execute(
        "SELECT g.id AS id, g.dn AS dn FROM entries e "
        "JOIN memberships m ON m.directory = e.directory AND m.member_key = e.dn_key "
        "JOIN entries g ON g.directory = m.directory AND g.id = m.group_id "
        "WHERE e.directory = ? AND e.id = ? ORDER BY g.dn_key", (directory, entry_id))]


def group_dns(db: sqlite3.Connection, directory: str) -> dict[str, str]:
    """group id -> DN, read once: joining each membership row to its group's entry
    would read the group's whole row (its member list) once per member."""
    return dict(db.execute("SELECT id, dn FROM entries WHERE directory = ? AND "
                           "kind = 'group'", (directory,)).fetchall())


def member_of_all(db: sqlite3.Connection, directory: str) -> dict[str, list[str]]:
    """entry id -> DNs of the groups listing it (one query, for the export)."""
    groups = group_dns(db, directory)
    out: dict[str, list[str]] = {}
    for rid, gid in db.execute(
            "SELECT e.id, m.group_id FROM memberships m "
            "JOIN entries e ON e.directory = m.directory AND e.dn_key = m.member_key "
            "WHERE m.directory = ?", (directory,)):
        if gid in groups:
            out.setdefault(rid, []).append(groups[gid])
    return out


def unresolved_members(db: sqlite3.Connection, directory: str, limit: int = 20) -> dict:
    """Member DNs that name no entry of the snapshot: kept, and counted here."""
    sql = ("FROM memberships m "
           "LEFT JOIN entries e ON e.directory = m.directory AND e.dn_key = m.member_key "
           "WHERE m.directory = ? AND e.id IS NULL")
    count = db.execute("SELECT COUNT(*) " + sql, (directory,)).fetchone()[0]
    groups = group_dns(db, directory) if count else {}
    examples = [{"group_id": r[0], "group": groups.get(r[0], ""), "member": r[1]}
                for r in db.execute("SELECT m.group_id, m.member_dn " + sql +
                                    " ORDER BY m.group_id, m.member_key LIMIT ?",
                                    (directory, limit))]
    return {"count": count, "examples": examples}


def member_loops(db: sqlite3.Connection, directory: str, limit: int = 20) -> list[list[dict]]:
    """Cycles of group nesting (A in B in A), each as the groups ``[{"id", "dn"}]`` around it.

    Why report: nested evaluation by a consumer must not loop, and a cycle is
    usually a mistake in the directory; the groups still sync as they are.
    """
    edges: dict[str, list[str]] = {}
    names: dict[str, str] = {}
    groups = group_dns(db, directory)
    for gid, mid in db.execute(
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


def member_entries(db: sqlite3.Connection, directory: str, group_id: str) -> list[dict]:
    """A group's members that name an entry of the snapshot, as ``{id, kind, name}``
    (``name``: a group's name or a user's username), through the membership relation,
    so DNs match by meaning (:mod:`tether.dn`)."""
    return [{"id": r[0], "kind": r[1], "name": r[2]} for r in db.execute(
        "SELECT e.id, e.kind, COALESCE(json_extract(e.attributes, '$.name'), "
        "json_extract(e.attributes, '$.username')) FROM memberships m "
        "JOIN entries e ON e.directory = m.directory AND e.dn_key = m.member_key "
        "WHERE m.directory = ? AND m.group_id = ? ORDER BY m.member_key",
        (directory, group_id))]
