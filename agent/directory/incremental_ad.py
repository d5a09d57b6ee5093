"""Active Directory incremental sync: uSNChanged plus deleted objects (tombstones).

Why USNs for entries: the start cursor of a full sync is one rootDSE read
(highestCommittedUSN) instead of a whole extra DirSync pass. Large groups'
member lists are the exception: AD logs no values, so a changed group would be
re-read whole; the cursor also carries a DirSync cookie (`ds`, dirsync.py) and
the member values changed since it are applied to the list the follower last
sent (`remembered`), so a one-member change of a 100,000-member group reads one
value, not 100,000. Without DirSync (refused, or no cookie yet) groups are read
whole as before.

USNs are local to one DC, so the cursor names the DC (dsServiceName); if
another DC answers, or the cursor is older than the tombstone lifetime (after
which deletions are forgotten), the engine raises CursorExpired and the
caller runs a full resync instead of silently missing changes.
"""

from __future__ import annotations

import logging
import time
from typing import Iterator

import ldap3
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn

from tether import dn as dnmeaning

from tether.protocol.changes import INCREMENTAL, Begin, End

from . import cursor as cursors
from . import dirsync
from .chunking import chunked
from .config import DirectoryConfig
from .connection import Pool, check_result
from .errors import CursorExpired
from .mapping import entry_id, search_attributes, to_record
from .search import PoolSession, paged_search

log = logging.getLogger(__name__)
KIND = "ad-usn"
SHOW_DELETED = "1.2.840.113556.1.4.417"
DEFAULT_TOMBSTONE_DAYS = 180


def _root_dse(conn) -> dict:
    conn.search("", "(objectClass=*)", search_scope=ldap3.BASE,
                attributes=["highestCommittedUSN", "dsServiceName", "defaultNamingContext",
                            "configurationNamingContext"])
    check_result(conn, "reading the rootDSE")
    raw = conn.response[0]["raw_attributes"]
    return {k: v[0].decode() for k, v in raw.items() if v}


def start_cursor(config: DirectoryConfig, conn) -> str:
    """The DC's highestCommittedUSN now, tied to that DC, and a DirSync cookie of now
    (when the DC grants DirSync; taken after the USN: see _stream)."""
    dse = _root_dse(conn)
    return cursors.encode(KIND, usn=int(dse["highestCommittedUSN"]), dc=dse["dsServiceName"],
                          t=int(time.time()), **_cookie_now(conn, dse))


def _cookie_now(conn, dse: dict) -> dict:
    try:
        return {"ds": dirsync.encode_cookie(dirsync.cookie_now(conn, dse["defaultNamingContext"]))}
    except dirsync.DirSyncUnusable as exc:
        log.info("DirSync not usable (%s): large groups are re-read whole when they change", exc)
        return {}


def _tombstone_days(conn, dse: dict) -> int:
    dn = f"CN=Directory Service,CN=Windows NT,CN=Services,{dse.get('configurationNamingContext', '')}"
    conn.search(dn, "(objectClass=*)", search_scope=ldap3.BASE, attributes=["tombstoneLifetime"])
    try:
        return int(conn.response[0]["raw_attributes"]["tombstoneLifetime"][0])
    except (IndexError, KeyError, TypeError, ValueError):
        return DEFAULT_TOMBSTONE_DAYS


def changes_since(config: DirectoryConfig, cursor: str, chunk_size: int, pool: Pool,
                  remembered=None) -> Iterator[dict]:
    """Check the cursor against the DC now (CursorExpired), then return the stream.

    `remembered(group_id)`: the member list the caller last sent for a group, or
    None; with a DirSync cookie in the cursor, changed values are applied to it.
    """
    position = cursors.decode(cursor, KIND)
    session = PoolSession(pool)
    try:
        conn = session.connection()
        dse = _root_dse(conn)
        if dse.get("dsServiceName") != position.get("dc"):
            raise CursorExpired(f"the cursor was made on another domain controller "
                                f"({position.get('dc')}); USNs differ per DC", session.server)
        if time.time() - position.get("t", 0) > _tombstone_days(conn, dse) * 86400:
            raise CursorExpired("the cursor is older than the tombstone lifetime: deletions since "
                                "then may be forgotten", session.server)
    except BaseException:
        session.close()
        raise
    return _stream(config, session, int(position["usn"]), dse, chunk_size,
                   position.get("ds"), remembered)


def _usn(raw: dict) -> int:
    return int((raw.get("uSNChanged") or [b"0"])[0])


#: Most changed objects read by objectGUID after the scan; above, by filter per kind.
MAX_BY_GUID = 2_000
_SCAN_ATTRIBUTES = ["objectGUID", "uSNChanged", "objectClass", "isDeleted", "lastKnownParent",
                    "msDS-LastKnownRDN"]


def _changed(session, config, usn: int, nc: str, members=None,
             by_value: set[str] | None = None) -> list[tuple[int, dict]]:
    """(uSNChanged, record) for every user or group changed since `usn`: upserts for
    those in scope, deletes for those deleted or out of scope. `by_value` receives
    the ids of groups whose members came from `members` (not read).

    Why one scan first: Samba indexes no uSNChanged ranges, and a filter that adds
    `(objectClass=user)` makes it load every user (1.3 s at 100,000 users, 1.9 s
    with objectCategory) where the bare `(uSNChanged>=n)` costs 0.4 s. So one scan of
    the naming context (Show Deleted: deletions too) finds what changed, and the few
    changed objects are then read by objectGUID with the directory's filters
    (indexed: milliseconds). Windows AD indexes uSNChanged, so either way is fast there.
    Above MAX_BY_GUID changed objects the kinds are read by filter, as before.
    """
    live: dict[bytes, tuple[int, str]] = {}
    out: dict[str, tuple[int, dict]] = {}
    for page in paged_search(session, nc, f"(uSNChanged>={usn + 1})", _SCAN_ATTRIBUTES, config.page_size,
                             "changed objects", raw=True, controls=[(SHOW_DELETED, True, None)]):
        for e in page:
            raw = e["raw_attributes"]
            classes = {c.lower() for c in raw.get("objectClass") or raw.get("objectclass") or []}
            if not classes & {b"user", b"group"}:
                continue
            if (raw.get("isDeleted") or raw.get("isdeleted") or [b""])[0].upper() == b"TRUE":
                rec = _deleted_record(config, e["dn"], raw)
                out[rec["id"]] = (_usn(raw), rec)
            else:
                live[(raw.get("objectGUID") or raw["objectguid"])[0]] = (_usn(raw), e["dn"])
    by_guid = list(live) if len(live) <= MAX_BY_GUID else None
    if by_guid == []:
        return list(out.values())
    found = _changed_in_scope(session, config, usn, by_guid, members, by_value)
    for guid, (changed, dn) in live.items():  # not found in scope: it left it
        rec_id = entry_id(config, {"objectGUID": [guid]})
        out[rec_id] = found.get(rec_id) or (changed, {"op": "delete", "id": rec_id, "dn": dn})
    return list(out.values())


def _changed_in_scope(session, config, usn: int, guids: list[bytes] | None, members=None,
                      by_value_ids: set[str] | None = None) -> dict[str, tuple[int, dict]]:
    """Upserts for the changed entries in scope: those of `guids`, or (None) all since `usn`.

    `members(group_id)`: the group's member list now without reading it, or None;
    when given, changed groups are read without their members and only those it
    has no list for are read again whole.
    """
    out: dict[str, tuple[int, dict]] = {}
    for kind, flt in (("user", config.user_filter), ("group", config.group_filter)):
        attrs = search_attributes(config, kind) + ["uSNChanged"]
        by_value = kind == "group" and members is not None
        if by_value:
            attrs = [a for a in attrs if a.split(";")[0].lower() != config.member_attribute.lower()]
        filters = [f"(&{flt}(uSNChanged>={usn + 1}))"] if guids is None else _by_guid(flt, guids)
        whole: list[bytes] = []
        for search_filter in filters:
            for base in config.base_dns:
                for page in paged_search(session, base, search_filter, attrs, config.page_size,
                                         f"changed {kind}s", raw=True):
                    for e in page:
                        raw = e["raw_attributes"]
                        if by_value:
                            known = members(entry_id(config, raw))
                            if known is None:
                                whole.append((raw.get("objectGUID") or raw["objectguid"])[0])
                                continue
                            raw = {**raw, config.member_attribute: [m.encode() for m in known]}
                        rec = to_record(config, kind, e["dn"], raw)
                        if by_value and by_value_ids is not None:
                            by_value_ids.add(rec["id"])
                        out.setdefault(rec["id"], (_usn(raw), rec))
        for e in _groups_by_guid(session, config, whole):
            rec = to_record(config, kind, e["dn"], e["raw_attributes"])
            out.setdefault(rec["id"], (_usn(e["raw_attributes"]), rec))
    return out


def _by_guid(search_filter: str, guids: list[bytes]) -> list[str]:
    """`search_filter` narrowed to `guids`, 50 objectGUIDs per filter."""
    return ["(&" + search_filter + "(|" + "".join(_guid_filter(g) for g in guids[i:i + 50]) + "))"
            for i in range(0, len(guids), 50)]


def _guid_filter(guid: bytes) -> str:
    return "(objectGUID=" + "".join(f"\\{b:02x}" for b in guid) + ")"


def _groups_by_guid(session, config, guids: list[bytes]) -> Iterator[dict]:
    """Groups read whole (members in range pages), 50 objectGUIDs per search."""
    attrs = search_attributes(config, "group") + ["uSNChanged"]
    for search_filter in _by_guid(config.group_filter, guids):
        for base in config.base_dns:
            for page in paged_search(session, base, search_filter, attrs, config.page_size,
                                     "changed groups", raw=True):
                yield from page


def _tombstone_rdn(dn: str) -> str:
    """'CN=frank\\0ADEL:<guid>,CN=Deleted Objects,...' -> 'frank' (Samba has no msDS-LastKnownRDN)."""
    try:
        value = dnmeaning.rdn_value(dn)  # unescaped: a comma in the name stays in it
    except dnmeaning.DNError:
        value = dn.split(",", 1)[0].split("=", 1)[-1]
    return value.split("\nDEL:", 1)[0].split("\\0ADEL:", 1)[0]


def _deleted_record(config, tombstone_dn: str, raw: dict) -> dict:
    """The delete record of a deleted object, named by the DN it had (not its tombstone's)."""
    rec_id = entry_id(config, {"objectGUID": raw.get("objectGUID") or raw["objectguid"]})
    rdn = (raw.get("msDS-LastKnownRDN") or [b""])[0].decode() or _tombstone_rdn(tombstone_dn)
    parent = (raw.get("lastKnownParent") or [b""])[0].decode()
    dn = f"CN={escape_rdn(rdn)},{parent}" if rdn and parent else tombstone_dn
    return {"op": "delete", "id": rec_id, "dn": dn}


def _affected_groups(session, config, records: list[dict], by_value: set[str] = frozenset(),
                     remembered=None) -> list[dict]:
    """`records` with the groups whose member *DNs* changed without their own uSNChanged
    moving added (or, for groups in `by_value`, corrected).

    AD stores links by GUID, so renaming, moving or deleting a member changes
    the DNs a group lists but not the group's USN. Groups holding a changed
    entry are found by its current DN; a deletion leaves no link to search by,
    so any deletion looks at every group in scope (one paged search).

    `remembered(group_id)`: the member list the follower last sent. Such a group
    (or one in `by_value`, whose list was not read either) is read whole only when
    it lists a changed entry's DN that its list does not hold (a rename or a move);
    a deleted entry is taken out of its list by DN meaning (DirSync does not report
    links that go with their object); otherwise it is left as it is: a user's mail
    changed or a user deleted does not re-read the 100,000-member group it was in.
    """
    groups = {r["id"]: r for r in records if r.get("kind") == "group" and r["op"] == "upsert"}
    done = {r["id"] for r in records if r.get("kind") == "group"} - set(by_value)
    upserts = [r["dn"] for r in records if r["op"] == "upsert"]
    deletes = [r["dn"] for r in records if r["op"] == "delete"]
    if deletes:
        filters = [config.group_filter]
    else:
        filters = ["(&" + config.group_filter + "(|" + "".join(
            f"({config.member_attribute}={escape_filter_chars(dn)})" for dn in upserts[i:i + 50]) + "))"
            for i in range(0, len(upserts), 50)]
    light = remembered is not None
    attrs = search_attributes(config, "group")
    if light:  # members only for the groups that turn out to need them
        attrs = [a for a in attrs if a.split(";")[0].lower() != config.member_attribute.lower()]
    gone = _keys(deletes)
    changed: dict[str, dict] = {}
    whole: list[bytes] = []
    for flt in filters:
        for base in config.base_dns:
            for page in paged_search(session, base, flt, attrs, config.page_size, "groups of changed entries",
                                     raw=True):
                for e in page:
                    raw = e["raw_attributes"]
                    gid = entry_id(config, raw)
                    if gid in done:
                        continue
                    done.add(gid)
                    if not light:
                        changed[gid] = to_record(config, "group", e["dn"], raw)
                        continue
                    held = frozenset(groups[gid]["members"]) if gid in by_value else remembered(gid)
                    guid = (raw.get("objectGUID") or raw["objectguid"])[0]
                    if held is None or _lists_any(session, config, guid,
                                                  [d for d in upserts + deletes if d not in held]):
                        whole.append(guid)
                        continue
                    kept = _without(held, gone)
                    if len(kept) != len(held):
                        changed[gid] = to_record(config, "group", e["dn"], {
                            **raw, config.member_attribute: [m.encode() for m in sorted(kept)]})
    for e in _groups_by_guid(session, config, whole):
        rec = to_record(config, "group", e["dn"], e["raw_attributes"])
        changed[rec["id"]] = rec
    out = [changed.pop(r["id"], r) if r.get("kind") == "group" else r for r in records]
    return out + list(changed.values())


def _keys(dns: list[str]) -> set[str]:
    out = set()
    for dn in dns:
        try:
            out.add(dnmeaning.key(dn))
        except dnmeaning.DNError:
            pass
    return out


def _without(held: frozenset[str], gone: set[str]) -> frozenset[str]:
    """`held` without the DNs that mean one of `gone` (keys); `held` itself if none do."""
    if not gone:
        return held
    drop = {m for m in held if m in gone or _keys([m]) & gone}
    return held - drop if drop else held


def _lists_any(session, config, guid: bytes, dns: list[str]) -> bool:
    """Whether group `guid` lists any of `dns` now (50 DNs per search)."""
    for i in range(0, len(dns), 50):
        flt = "(&" + _guid_filter(guid) + "(|" + "".join(
            f"({config.member_attribute}={escape_filter_chars(dn)})" for dn in dns[i:i + 50]) + "))"
        for base in config.base_dns:
            for page in paged_search(session, base, flt, ["objectGUID"], config.page_size,
                                     "groups of renamed entries", raw=True):
                if page:
                    return True
    return False


def _member_values(session, config, nc: str, cookie: str | None, remembered):
    """(members(group_id) for _changed or None, the cursor's next `ds` fields).

    The DirSync request runs after the rootDSE read of `high` and before the USN
    searches: a member change after `high` makes the next run read its group again
    (whose held list then has it, which applying values again leaves as is), and
    one after this request is in the next DirSync answer."""
    conn = session.connection()
    if config.member_attribute.lower() in {a.lower() for a in config.group_mapping.values()}:
        return None, {}  # members are a mapped attribute: groups are always read whole
    if not cookie:
        return None, _cookie_now(conn, {"defaultNamingContext": nc})
    if remembered is None:  # nothing to apply values to: the cookie stays (an older one is fine)
        return None, {"ds": cookie}
    try:
        changed, after = dirsync.member_changes(config, conn, nc, dirsync.decode_cookie(cookie))
    except (dirsync.DirSyncUnusable, ValueError) as exc:
        log.info("DirSync not usable (%s): changed groups are read whole this time", exc)
        return None, _cookie_now(conn, {"defaultNamingContext": nc})
    return (lambda gid: dirsync.apply(remembered(gid), changed.get(gid))), \
        {"ds": dirsync.encode_cookie(after)}


def _stream(config, session: PoolSession, usn: int, dse: dict, chunk_size: int,
            cookie: str | None = None, remembered=None):
    try:
        yield Begin(INCREMENTAL, config.name).encode()
        high = int(dse["highestCommittedUSN"])  # read before searching: later changes come next time
        nc = dse["defaultNamingContext"]
        members, ds = _member_values(session, config, nc, cookie, remembered)
        by_value: set[str] = set()
        changes = _changed(session, config, usn, nc, members, by_value)
        changes.sort(key=lambda pair: pair[0])
        records = [rec for _, rec in changes]
        records = _affected_groups(session, config, records, by_value,
                                   remembered if members is not None else None)
        number = 0
        for chunk in chunked(records, chunk_size):
            number = chunk["seq"]
            yield chunk
        cursor = cursors.encode(KIND, usn=high, dc=dse["dsServiceName"], t=int(time.time()), **ds)
        yield End(INCREMENTAL, len(records), cursor, number + 1,
                  {"server": session.server, "failovers": session.failovers}).encode()
    finally:
        session.close()
