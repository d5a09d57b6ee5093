"""Group membership of a user, nested groups included.

Why two strategies: AD evaluates nesting itself (LDAP_MATCHING_RULE_IN_CHAIN),
OpenLDAP has no such rule, so we walk up `member` links breadth-first, with a
visited set so cyclic nesting cannot loop.
"""

from __future__ import annotations

from ldap3.utils.conv import escape_filter_chars

from tether import dn as dnmeaning

from .config import DirectoryConfig
from . import requestber
from .connection import check_result
from .mapping import search_attributes, to_record

IN_CHAIN = "1.2.840.113556.1.4.1941"


def _groups_with_member(config: DirectoryConfig, conn, dns: list[str], chain: bool) -> list[dict]:
    """Groups listing any of `dns` as member (one search for the whole list)."""
    rule = f":{IN_CHAIN}:" if chain else ""
    ors = "".join(f"({config.member_attribute}{rule}={escape_filter_chars(dn)})" for dn in dns)
    flt = f"(&{config.group_filter}(|{ors}))"
    attrs = [a for a in search_attributes(config, "group")
             if a.split(";")[0].lower() != config.member_attribute.lower()]
    out = []
    for base in config.base_dns:
        requestber.search(conn, base, flt, attrs)
        if (conn.result or {}).get("result") == 32:
            continue
        check_result(conn, f"group lookup for {dns[0]!r}")
        for e in conn.response:
            if e.get("type") == "searchResEntry":
                rec = to_record(config, "group", e["dn"], e["raw_attributes"])
                out.append({"id": rec["id"], "dn": rec["dn"], "name": rec["attributes"].get("name")})
    return out


def _key(dn: str) -> str:
    """Groups are the same when their DNs mean the same (a broken DN: its spelling)."""
    try:
        return dnmeaning.key(dn)
    except dnmeaning.DNError:
        return dn.lower()


def groups_of(config: DirectoryConfig, conn, dn: str) -> list[dict]:
    """Every group `dn` belongs to, directly or through nested groups, sorted by DN."""
    if config.kind == "ad":
        found = _groups_with_member(config, conn, [dn], chain=True)
        return sorted(found, key=lambda g: g["dn"].lower())
    seen: dict[str, dict] = {}
    frontier = [dn]
    while frontier:  # one search per nesting level, all members of the level at once
        nxt = []
        for i in range(0, len(frontier), 50):
            for g in _groups_with_member(config, conn, frontier[i:i + 50], chain=False):
                if _key(g["dn"]) not in seen:
                    seen[_key(g["dn"])] = g
                    nxt.append(g["dn"])
        frontier = nxt
    return sorted(seen.values(), key=lambda g: g["dn"].lower())
