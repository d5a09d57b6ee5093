"""OpenLDAP incremental sync from the accesslog overlay (cn=accesslog).

Why the accesslog: it records deletes and renames with the entry's entryUUID
(reqEntryUUID), which entryCSN/modifyTimestamp searches cannot see. The cursor
is the entryCSN of the last log record handled. It is honoured only while that
record is still in the log: once purged (olcAccessLogPurge) or lost, the
engine raises CursorExpired and the caller runs a full resync.

Records are state-based: for every entry touched since the cursor the engine
reads the entry as it is *now*, so replaying a range twice is harmless.

Large groups: when the caller remembers a group's member list as it last sent
it (`remembered`, the follower's member memory) and the log shows only member
values added and deleted since, the group is read without its members and its
list is that memory with the logged changes applied (reqMod), so a one-member
change of a 100,000-member group does not read 100,000 values again. Any doubt
(a replace of the list, a value added twice or deleted while absent, a mapped
member attribute) reads the group whole, as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Iterator

import ldap3

from tether import dn as dnmeaning

from tether.protocol.changes import INCREMENTAL, Begin, End

from . import cursor as cursors
from .chunking import chunked
from .config import DirectoryConfig
from .connection import Pool, check_result
from .errors import CursorExpired, DirectoryError
from .mapping import _text, search_attributes, to_record
from .search import PoolSession, paged_search

KIND = "openldap-accesslog"
LOG_BASE = "cn=accesslog"
BATCH = 50
#: What the caller remembers of a group (its member list as last sent), or None.
Remembered = Callable[[str], "frozenset[str] | None"]


def _read_base(conn, dn: str, attrs: list[str]) -> dict | None:
    conn.search(dn, "(objectClass=*)", search_scope=ldap3.BASE, attributes=attrs)
    if (conn.result or {}).get("result") == 32:
        return None
    check_result(conn, f"reading {dn}")
    return conn.response[0]["raw_attributes"] if conn.response else None


def start_cursor(config: DirectoryConfig, conn) -> str:
    """The newest log record's CSN (the accesslog's contextCSN), or 'empty log'."""
    entry = _read_base(conn, LOG_BASE, ["contextCSN"])
    if entry is None:
        raise DirectoryError("config", f"directory {config.name!r} has no readable {LOG_BASE}: enable "
                             "the accesslog overlay (logops writes) and let the bind DN read it")
    csns = sorted(v.decode() for v in entry.get("contextCSN", []))
    if not csns:
        return cursors.encode(KIND, csn=None)
    return cursors.encode(KIND, csn=csns[-1])


def _check_honoured(conn, csn: str | None) -> None:
    if csn is None:
        return
    conn.search(LOG_BASE, f"(entryCSN={csn})", attributes=["reqType"])
    check_result(conn, "checking the sync cursor")
    if not conn.response:
        raise CursorExpired(f"the accesslog no longer holds the change at {csn} "
                            "(purged or reset); a full resync is needed")


def _in_scope(config: DirectoryConfig, dn: str | None) -> bool:
    """`dn` at or below a synced base, compared by meaning (tether.dn), not by spelling."""
    return bool(dn) and any(dnmeaning.within(dn, b) for b in config.base_dns)


def _log_records(session: PoolSession, config: DirectoryConfig, csn: str | None) -> list[dict]:
    flt = "(&(objectClass=auditWriteObject)(reqResult=0)" + (f"(entryCSN>={csn}))" if csn else ")")
    out = []
    for page in paged_search(session, LOG_BASE, flt, ["reqType", "reqDN", "reqNewDN", "reqEntryUUID",
                                                       "entryCSN", "reqMod"], 1000, "reading the accesslog"):
        for e in page:
            raw = e["raw_attributes"]
            mods = raw.get("reqMod") or []  # bytes: values of any attribute, binary ones too
            a = {k: [v.decode(errors="replace") for v in vals] for k, vals in raw.items() if k != "reqMod"}
            rec_csn = a.get("entryCSN", [""])[0]
            if rec_csn == csn or not a.get("reqEntryUUID"):
                continue
            out.append({"csn": rec_csn, "type": a.get("reqType", [""])[0], "dn": a.get("reqDN", [""])[0],
                        "new_dn": (a.get("reqNewDN") or [None])[0], "id": a["reqEntryUUID"][0],
                        "mods": mods if a.get("reqType", [""])[0] == "modify" else None})
    out.sort(key=lambda r: r["csn"])
    return out


def member_changes(config: DirectoryConfig, history: list[dict], known: frozenset[str]) -> list[str] | None:
    """The member list after the logged modifications of one group, applied to `known`.

    None when the log alone cannot tell (not only modifies, a replace or delete-all
    of the member attribute, a value added while present or deleted while absent,
    as when the list was read after some of these changes): read the group then.
    """
    name = config.member_attribute.lower().encode()
    members = set(known)
    for rec in history:
        if rec["type"] != "modify" or rec["mods"] is None:
            return None
        for mod in rec["mods"]:
            attr, sep, rest = mod.partition(b":")
            if not sep or attr.lower() != name:
                if attr.split(b";")[0].lower() == name:
                    return None  # an option (member;range=...): not a plain change
                continue
            op, value = rest[:1], rest[2:]
            if rest[1:2] != b" " or op not in (b"+", b"-"):
                return None  # replace, delete-all or anything else
            dn = _text([value])[0]
            if op == b"+":
                if dn in members:
                    return None
                members.add(dn)
            else:
                if dn not in members:
                    return None
                members.discard(dn)
    return list(members)  # order carries no meaning in LDAP; the follower sends the difference


def _fetch_current(session: PoolSession, config: DirectoryConfig, ids: list[str],
                   members: dict[str, list[str]] | None = None) -> dict[str, dict]:
    """Current upsert records of the given entryUUIDs that match the user/group filters.

    `members`: groups whose member list is already known (member_changes); they
    are read without the member attribute and get that list.
    """
    found: dict[str, dict] = {}
    members = members or {}
    for i in range(0, len(ids), BATCH):
        ors = "(|" + "".join(f"(entryUUID={x})" for x in ids[i:i + BATCH]) + ")"
        for kind, flt in (("user", config.user_filter), ("group", config.group_filter)):
            for base in config.base_dns:
                for page in paged_search(session, base, f"(&{flt}{ors})", search_attributes(config, kind),
                                         config.page_size, f"reading changed {kind}s", raw=True):
                    for e in page:
                        rec = to_record(config, kind, e["dn"], e["raw_attributes"])
                        found.setdefault(rec["id"], rec)
    known = list(members)
    attrs = [a for a in search_attributes(config, "group")
             if a.split(";")[0].lower() != config.member_attribute.lower()]
    for i in range(0, len(known), BATCH):
        ors = "(|" + "".join(f"(entryUUID={x})" for x in known[i:i + BATCH]) + ")"
        for base in config.base_dns:
            for page in paged_search(session, base, f"(&{config.group_filter}{ors})", attrs,
                                     config.page_size, "reading changed groups", raw=True):
                for e in page:
                    rec = to_record(config, "group", e["dn"], e["raw_attributes"])
                    rec["members"] = members[rec["id"]]
                    found.setdefault(rec["id"], rec)
    return found


def changes_since(config: DirectoryConfig, cursor: str, chunk_size: int, pool: Pool,
                  remembered: Remembered | None = None) -> Iterator[dict]:
    """Validate the cursor eagerly (CursorExpired), then return the stream generator."""
    position = cursors.decode(cursor, KIND)
    session = PoolSession(pool)
    try:
        _check_honoured(session.connection(), position.get("csn"))
    except BaseException:
        session.close()
        raise
    return _stream(config, session, position.get("csn"), chunk_size, remembered)


def _stream(config: DirectoryConfig, session: PoolSession, csn: str | None, chunk_size: int,
            remembered: Remembered | None = None):
    try:
        yield Begin(INCREMENTAL, config.name).encode()
        log = _log_records(session, config, csn)
        last: dict[str, dict] = {}
        renamed: dict[str, str] = {}
        history: dict[str, list[dict]] = {}
        for rec in log:
            if not (_in_scope(config, rec["dn"]) or _in_scope(config, rec["new_dn"])):
                continue
            if rec["type"] == "modrdn":
                renamed.setdefault(rec["id"], rec["dn"])
            last.pop(rec["id"], None)
            last[rec["id"]] = rec  # re-insert keeps dict order = order of last change
            history.setdefault(rec["id"], []).append(rec)
        known: dict[str, list[str]] = {}
        mapped = {a.lower() for a in config.group_mapping.values()}
        if remembered is not None and config.member_attribute.lower() not in mapped:
            for entry_id in last:
                held = remembered(entry_id)
                if held is not None:
                    after = member_changes(config, history[entry_id], held)
                    if after is not None:
                        known[entry_id] = after
        live = [i for i, r in last.items() if r["type"] != "delete" and i not in known]
        current = _fetch_current(session, config, live, known)
        records = []
        for entry_id, rec in last.items():
            if entry_id in current:
                out = current[entry_id]
                if entry_id in renamed and not dnmeaning.same(renamed[entry_id], out["dn"]):
                    out["old_dn"] = renamed[entry_id]
                records.append(out)
            else:
                records.append({"op": "delete", "id": entry_id, "dn": rec["new_dn"] or rec["dn"]})
        number = 0
        for chunk in chunked(records, chunk_size):
            number = chunk["seq"]
            yield chunk
        new_csn = log[-1]["csn"] if log else csn
        yield End(INCREMENTAL, len(records), cursors.encode(KIND, csn=new_csn), number + 1,
                  {"server": session.server, "failovers": session.failovers}).encode()
    finally:
        session.close()
