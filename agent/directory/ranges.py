"""Ranged values (AD's `member;range=0-1499`): read every page of a multi-valued attribute.

Why the engine follows ranges itself instead of ldap3's auto_range: auto_range
stops silently when a follow-up search fails (a group would arrive with its
first 1,500 members only, and home would drop the others as a whole state),
fails with TypeError or KeyError on an answer to an explicit range request,
and double-counts values of entries the fast receive path (wire.py) decoded.
Here every gap, a range that does not continue where the last one ended, or a
failed read is a DirectoryError naming the entry: the follower retries the
whole sync instead of sending a truncated group.

Windows AD ranges any attribute above MaxValRange (1,500 values) by itself.
Samba does not, but honours an explicit `member;range=0-N` request; the
directory setting `member_range_size` makes the engine ask for members that
way (tests use it against Samba to run this code on a real server).
"""

from __future__ import annotations

import re

import ldap3

from .connection import check_result
from .errors import DirectoryError

_RANGE = re.compile(r"^(?P<attr>[^;]+(?:;(?!range=)[^;]+)*);range=(?P<lo>\d+)-(?P<hi>\d+|\*)$", re.I)
#: Most follow-up reads for one attribute of one entry (AD pages hold 1,500 values:
#: 10,000 reads are 15 million values, far beyond any record home accepts).
MAX_READS = 10_000


def is_ranged(entry: dict) -> bool:
    return any(";range=" in name.lower() for name in entry.get("raw_attributes") or ())


def parse(name: str) -> tuple[str, int, int | None] | None:
    """('member', 0, 1499) for 'member;range=0-1499'; hi None for '*' (the last page)."""
    m = _RANGE.match(name)
    if not m:
        return None
    return m["attr"], int(m["lo"]), None if m["hi"] == "*" else int(m["hi"])


def complete(conn, entry: dict, page: int | None = None) -> None:
    """Replace each `attr;range=lo-hi` of a search entry by `attr` with all its values.

    `page`: values to ask for per follow-up read (None: `hi+1-*`, the server decides).
    """
    raw = entry["raw_attributes"]
    dn = entry.get("dn")
    for name in [k for k in raw if ";range=" in k.lower()]:
        parsed = parse(name)
        if parsed is None or parsed[1] != 0:
            raise DirectoryError("operation_failed", f"{dn}: the server sent attribute {name!r}, "
                                 "which is not the first page of a value range; check the server")
        attr, _, hi = parsed
        values = list(raw.pop(name))
        reads = 0
        while hi is not None:
            start = hi + 1
            want = f"{attr};range={start}-{start + page - 1 if page else '*'}"
            reads += 1
            if reads > MAX_READS:
                raise DirectoryError("operation_failed", f"{dn}: more than {MAX_READS} pages of "
                                     f"{attr} values; the entry is too large to synchronize")
            try:
                conn.search(dn, "(objectClass=*)", search_scope=ldap3.BASE, attributes=[want])
            except ldap3.core.exceptions.LDAPException as exc:
                raise DirectoryError("operation_failed", f"{dn}: reading {want} failed ({exc}); "
                                     "the sync is retried") from None
            check_result(conn, f"reading {want} of {dn}")
            hits = [e for e in conn.response or [] if e.get("type") == "searchResEntry"]
            more = hits[0]["raw_attributes"] if hits else {}
            got = [(k, parse(k)) for k in more if ";range=" in k.lower()]
            got = [(k, p) for k, p in got if p and p[0].lower() == attr.lower()]
            if not got or got[0][1][1] != start or (not more[got[0][0]] and got[0][1][2] is not None):
                raise DirectoryError("operation_failed", f"{dn}: the server did not continue the "
                                     f"values of {attr} at {start} (answered "
                                     f"{sorted(more) or 'nothing'}); the sync is retried")
            values += more[got[0][0]]
            hi = got[0][1][2]
        raw[attr] = raw.get(attr, []) + values if raw.get(attr) else values
