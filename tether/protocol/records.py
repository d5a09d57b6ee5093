"""The member-delta record of the change stream: one group's members as a change.

Why a delta at all: a one-member change of a 100,000-member group would
otherwise travel as a whole record of several megabytes (about 25 parts) that
home has to join, parse and diff; the delta is a few hundred bytes. Records
stay whole states for everything but the member list, and the delta names the
member list it applies to (``base_count``), so home can tell when it does not
hold that list and asks for a full sync instead of guessing.

Why a new ``op`` and not an ``upsert`` without ``members``: a home that does
not know deltas must refuse the record (``record op 'members'``), never read
it as a group whose members were all removed.

Wire shape (a record inside a ``chunk``'s ``changes``)::

    {"op": "members", "kind": "group", "id": "<entryUUID|objectGUID>", "dn": "...",
     "attributes": {...}, "encodings"?: {...}, "problems"?: [...], "old_dn"?: "...",
     "base_count": 100000, "add": ["uid=new,..."], "remove": []}

``attributes``, ``encodings``, ``problems`` and ``dn`` are the group's whole
state as in an ``upsert``; ``add`` and ``remove`` are member DNs as the server
spells them (disjoint, each without duplicates); ``base_count`` is the number
of members of the group as the agent last sent it (whole or by delta). The
agent sends a delta only inside an ``incremental`` stream, for a group whose
member list it sent earlier in the same run of its follower.

Applying: the group's stored member list must hold exactly ``base_count``
values, every ``remove`` value and none of the ``add`` values (by DN meaning);
then ``remove`` values go and ``add`` values join. Otherwise home applies
nothing of the record and asks the leader for a full sync. Applying one twice
in a row fails that check (count) rather than corrupting anything.
"""

from __future__ import annotations

from .schema import ErrorCode, ProtocolError

#: ``op`` of a member-delta record.
MEMBER_DELTA_OP = "members"
#: Most DNs in ``add`` + ``remove`` of one delta (a larger change goes whole).
MAX_DELTA_VALUES = 100_000


def member_delta(record: dict, base_count: int, add: list[str], remove: list[str]) -> dict:
    """The delta form of a group ``upsert`` record (everything but ``members`` kept)."""
    out = {k: v for k, v in record.items() if k not in ("op", "members")}
    out["op"] = MEMBER_DELTA_OP
    out["base_count"] = base_count
    out["add"] = add
    out["remove"] = remove
    return out


def check_member_delta(record: dict) -> tuple[int, list[str], list[str]]:
    """(base_count, add, remove) of a received delta; ProtocolError (bad_type) if malformed."""
    base, add, remove = record.get("base_count"), record.get("add"), record.get("remove")
    if record.get("kind") != "group":
        raise ProtocolError(ErrorCode.BAD_TYPE, "a member delta must be of kind group")
    if not isinstance(base, int) or isinstance(base, bool) or base < 0:
        raise ProtocolError(ErrorCode.BAD_TYPE, "a member delta needs base_count, a count >= 0")
    if not (isinstance(add, list) and isinstance(remove, list)):
        raise ProtocolError(ErrorCode.BAD_TYPE, "a member delta needs add and remove lists of DNs")
    if len(add) + len(remove) > MAX_DELTA_VALUES:
        raise ProtocolError(ErrorCode.BAD_TYPE, f"a member delta holds more than {MAX_DELTA_VALUES} DNs")
    if not all(isinstance(v, str) and v for v in add + remove):
        raise ProtocolError(ErrorCode.BAD_TYPE, "a member delta's add and remove hold only DN strings")
    if len(set(add)) != len(add) or len(set(remove)) != len(remove) or set(add) & set(remove):
        raise ProtocolError(ErrorCode.BAD_TYPE, "a member delta's add and remove must be disjoint, "
                            "without duplicates")
    return base, add, remove
