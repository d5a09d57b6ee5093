"""AD group membership changes by value: DirSync with incremental values (MS-ADTS 3.1.1.3.4.1.3).

Why: AD logs no values, so an incremental sync that sees a group's uSNChanged
move used to re-read the whole member list, in 1,500-value range pages: about
12 s for a 100,000-member group on Samba, for a one-member change. DirSync with
LDAP_DIRSYNC_INCREMENTAL_VALUES answers only the member values that changed
since a cookie, each with its state now (`member;range=1-1`: present,
`member;range=0-0`: gone), so the follower applies them to the list it last
sent (deltas.MemberMemory) and reads only the group's other attributes.

Why the control is encoded here: ldap3's `dir_sync_control` turns the flag
0x80000000 into a 5-byte INTEGER on 64-bit Linux (ctypes.c_long is 64 bits
there), which AD does not read as the flag; AD wants the 32-bit value as 4
bytes. LDAP_DIRSYNC_OBJECT_SECURITY lets an account without the "Replicating
Directory Changes" right use DirSync (it sees what it may read).

Applying a value's state now is idempotent, so a change that the list already
holds (read after the cookie was taken) is harmless; the caller takes each
cookie after the USN it pairs it with (incremental_ad). Anything unexpected
(the control refused, a server without linked-value replication answering a
whole `member` list, a removal of a value the list does not hold) raises
:class:`DirSyncUnusable` or returns None, and the caller reads the group whole
as before: never a guessed list.
"""

from __future__ import annotations

import base64
import re

import ldap3

from .mapping import _text as text_values
from .mapping import entry_id
from .requestber import _integer, tlv

OID = "1.2.840.113556.1.4.841"
#: LDAP_DIRSYNC_INCREMENTAL_VALUES | LDAP_DIRSYNC_OBJECT_SECURITY
FLAGS = 0x80000001
#: Largest answer per request the server is asked for (it pages beyond: more_results).
MAX_BYTES = 1 << 20
#: Most DirSync requests of one incremental sync (each up to MAX_BYTES).
MAX_PAGES = 1000
#: A filter no object matches: the first request only needs the cookie of "now".
NOTHING = "(&(objectClass=group)(objectClass=user)(!(objectClass=*)))"
#: Marks a group whose DirSync answer was a whole member list (read it whole).
WHOLE = "\0whole"
_VALUE_RANGE = re.compile(r"^(?P<attr>[^;]+);range=(?P<state>[01])-(?P=state)$", re.I)


class DirSyncUnusable(Exception):
    """The server does not answer DirSync as needed: read groups whole instead."""


def control(cookie: bytes) -> tuple[str, bool, bytes]:
    """The DirSync request control (critical) for ldap3: flags as 4 bytes, as AD reads them."""
    value = tlv(0x30, tlv(0x02, FLAGS.to_bytes(4, "big")) + _integer(0x02, MAX_BYTES)
                + tlv(0x04, cookie))
    return OID, True, value


def encode_cookie(cookie: bytes) -> str:
    return base64.b64encode(cookie).decode()


def decode_cookie(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


def _request(conn, nc: str, search_filter: str, attributes: list[str], cookie: bytes) -> tuple[list, bytes, bool]:
    try:
        conn.search(nc, search_filter, search_scope=ldap3.SUBTREE, attributes=attributes,
                    controls=[control(cookie)])
    except ldap3.core.exceptions.LDAPException as exc:
        raise DirSyncUnusable(f"DirSync request failed: {exc}") from None
    res = conn.result or {}
    if res.get("result") != 0:
        raise DirSyncUnusable(f"DirSync refused: {res.get('description')} {res.get('message') or ''}".strip())
    answer = ((res.get("controls") or {}).get(OID) or {}).get("value") or {}
    if not answer.get("cookie"):
        raise DirSyncUnusable("DirSync answer carried no cookie")
    entries = [e for e in conn.response if e.get("type") == "searchResEntry"]
    return entries, bytes(answer["cookie"]), bool(answer.get("more_results"))


def cookie_now(conn, nc: str) -> bytes:
    """A cookie for "now" (a request that matches nothing still advances it)."""
    cookie, more, pages = b"", True, 0
    while more:
        pages += 1
        if pages > MAX_PAGES:
            raise DirSyncUnusable(f"DirSync did not finish within {MAX_PAGES} requests")
        _, cookie, more = _request(conn, nc, NOTHING, ["objectGUID"], cookie)
    return cookie


def member_changes(config, conn, nc: str, cookie: bytes) -> tuple[dict[str, dict[str, bool]], bytes]:
    """Member values changed since `cookie`: {group id: {member DN: present now}}, new cookie.

    A group whose answer is a whole plain list (no linked-value replication) is
    marked with :data:`WHOLE` so the caller reads it whole.
    """
    member = config.member_attribute.lower()
    changes: dict[str, dict[str, bool]] = {}
    more, pages = True, 0
    while more:
        pages += 1
        if pages > MAX_PAGES:
            raise DirSyncUnusable(f"DirSync did not finish within {MAX_PAGES} requests")
        entries, cookie, more = _request(conn, nc, config.group_filter, [config.member_attribute], cookie)
        for entry in entries:
            raw = entry["raw_attributes"]
            values = changes.setdefault(entry_id(config, raw), {})
            for key, vals in raw.items():
                m = _VALUE_RANGE.match(key)
                if m and m["attr"].lower() == member:
                    for v in text_values(vals):  # decoded as to_record decodes members
                        values[v] = m["state"] == "1"
                elif key.lower() == member and vals:  # a whole list: no value-level changes
                    values[WHOLE] = True
    return changes, cookie


def apply(held: frozenset[str] | None, values: dict[str, bool] | None) -> list[str] | None:
    """`held` with the changed values applied; None when the group must be read whole.

    None when nothing is held, the answer was a whole list, or a removed value is
    not in `held` as spelled (the held list is not what the server's changes apply to).
    """
    if held is None:
        return None
    if not values:
        return sorted(held)
    if WHOLE in values:
        return None
    gone = {v for v, present in values.items() if not present}
    if not gone <= held:
        return None
    return sorted((held - gone) | {v for v, present in values.items() if present})
