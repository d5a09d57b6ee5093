"""OpenLDAP incremental sync from the accesslog overlay (cn=accesslog).

Why the accesslog: it records deletes and renames with the entry's entryUUID
(reqEntryUUID), which entryCSN/modifyTimestamp searches cannot see. The cursor
is the entryCSN of the last log record handled. It is honoured only while that
record is still in the log: once purged (olcAccessLogPurge) or lost, the
engine raises CursorExpired and the caller runs a full resync.

Records are state-based: for every entry touched since the cursor the engine
reads the entry as it is *now*, so replaying a range twice is harmless.
"""

from __future__ import annotations

from typing import Iterator

import ldap3

from tether import dn as dnmeaning

from . import cursor as cursors
from .chunking import chunked
from .config import DirectoryConfig
from .connection import Pool, check_result
from .errors import CursorExpired, DirectoryError
from .mapping import search_attributes, to_record
from .search import PoolSession, paged_search

KIND = "openldap-accesslog"
LOG_BASE = "cn=accesslog"
BATCH = 50


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
                                                       "entryCSN"], 1000, "reading the accesslog"):
        for e in page:
            a = {k: [v.decode() for v in vals] for k, vals in e["raw_attributes"].items()}
            rec_csn = a.get("entryCSN", [""])[0]
            if rec_csn == csn or not a.get("reqEntryUUID"):
                continue
            out.append({"csn": rec_csn, "type": a.get("reqType", [""])[0], "dn": a.get("reqDN", [""])[0],
                        "new_dn": (a.get("reqNewDN") or [None])[0], "id": a["reqEntryUUID"][0]})
    out.sort(key=lambda r: r["csn"])
    return out


def _fetch_current(session: PoolSession, config: DirectoryConfig, ids: list[str]) -> dict[str, dict]:
    """Current upsert records of the given entryUUIDs that match the user/group filters."""
    found: dict[str, dict] = {}
    for i in range(0, len(ids), BATCH):
        ors = "(|" + "".join(f"(entryUUID={x})" for x in ids[i:i + BATCH]) + ")"
        for kind, flt in (("user", config.user_filter), ("group", config.group_filter)):
            for base in config.base_dns:
                for page in paged_search(session, base, f"(&{flt}{ors})", search_attributes(config, kind),
                                         config.page_size, f"reading changed {kind}s", raw=True):
                    for e in page:
                        rec = to_record(config, kind, e["dn"], e["raw_attributes"])
                        found.setdefault(rec["id"], rec)
    return found


def changes_since(config: DirectoryConfig, cursor: str, chunk_size: int, pool: Pool) -> Iterator[dict]:
    """Validate the cursor eagerly (CursorExpired), then return the stream generator."""
    position = cursors.decode(cursor, KIND)
    session = PoolSession(pool)
    try:
        _check_honoured(session.connection(), position.get("csn"))
    except BaseException:
        session.close()
        raise
    return _stream(config, session, position.get("csn"), chunk_size)


def _stream(config: DirectoryConfig, session: PoolSession, csn: str | None, chunk_size: int):
    try:
        yield {"type": "begin", "mode": "incremental", "directory": config.name}
        log = _log_records(session, config, csn)
        last: dict[str, dict] = {}
        renamed: dict[str, str] = {}
        for rec in log:
            if not (_in_scope(config, rec["dn"]) or _in_scope(config, rec["new_dn"])):
                continue
            if rec["type"] == "modrdn":
                renamed.setdefault(rec["id"], rec["dn"])
            last.pop(rec["id"], None)
            last[rec["id"]] = rec  # re-insert keeps dict order = order of last change
        live = [i for i, r in last.items() if r["type"] != "delete"]
        current = _fetch_current(session, config, live)
        records = []
        for entry_id, rec in last.items():
            if entry_id in current:
                out = current[entry_id]
                if entry_id in renamed and not dnmeaning.same(renamed[entry_id], out["dn"]):
                    out["old_dn"] = renamed[entry_id]
                records.append(out)
            else:
                records.append({"op": "delete", "id": entry_id, "dn": rec["new_dn"] or rec["dn"]})
        seq = 0
        for chunk in chunked(records, chunk_size):
            seq = chunk["seq"]
            yield chunk
        new_csn = log[-1]["csn"] if log else csn
        yield {"type": "end", "seq": seq + 1, "mode": "incremental", "count": len(records),
               "cursor": cursors.encode(KIND, csn=new_csn), "server": session.server,
               "failovers": session.failovers}
    finally:
        session.close()
