"""Large groups' member lists as changes: what the follower last sent, and the difference.

Why in the follower and not in the engine: only the follower knows what went
into the spool (and so, in order and exactly once, to home). It remembers the
member list of every large group it spooled in this run and, in an incremental
stream, turns the next whole record of such a group into a member delta
(tether.protocol.records) when the change is small: a one-member change of a
100,000-member group then travels as a few hundred bytes instead of megabytes
that home would join, parse and diff.

Why forget on any doubt: a delta is only right on top of the list home holds.
A failed attempt (its later entries may be missing), a new follower, a full
sync: each starts from nothing, so the next change of a group goes whole again.
Home checks the count and the values too, and asks for a full sync on a mismatch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from tether import protocol as p

#: Groups with fewer members go whole (small anyway): nothing to remember.
MIN_MEMBERS = 2_000
#: Most member values remembered over all groups (bounds the agent's memory,
#: about 10 MB per 100,000 DNs); groups beyond it simply go whole.
MAX_REMEMBERED = 600_000
#: A change touching more than this share of the list goes whole.
MAX_SHARE = 0.25


class MemberMemory:
    """Member lists (as sets of DNs as the server spells them) of large groups sent home."""

    def __init__(self, min_members: int = MIN_MEMBERS, max_remembered: int = MAX_REMEMBERED):
        self.min_members, self.max_remembered = min_members, max_remembered
        self.groups: dict[str, frozenset[str]] = {}
        self.total = 0

    def forget(self) -> None:
        self.groups.clear()
        self.total = 0

    def _drop(self, gid: str) -> None:
        old = self.groups.pop(gid, None)
        if old is not None:
            self.total -= len(old)

    def _remember(self, gid: str, members: frozenset[str]) -> None:
        self._drop(gid)
        if len(members) >= self.min_members and self.total + len(members) <= self.max_remembered:
            self.groups[gid] = members
            self.total += len(members)

    def stream(self, messages: Iterable[dict]) -> Iterator[dict]:
        """The stream with small changes of remembered groups as deltas (incremental only)."""
        incremental = False
        for msg in messages:
            kind = msg.get("type")
            if kind == "begin":
                incremental = msg.get("mode") == "incremental"
                if not incremental:
                    self.forget()  # home swaps its snapshot at this stream's end
            elif kind == "chunk":
                msg = {**msg, "changes": [self._record(r, incremental) for r in msg["changes"]]}
            yield msg

    def _record(self, record: dict, incremental: bool) -> dict:
        gid = record.get("id")
        if not isinstance(gid, str):
            return record
        if record.get("op") == "delete":
            self._drop(gid)
            return record
        if record.get("kind") != "group":
            return record
        if record.get("op") != "upsert" or not isinstance(record.get("members"), list):
            self._drop(gid)
            return record
        members = record["members"]
        new = frozenset(members)
        if len(new) != len(members):  # the same spelling twice: a list a set cannot stand for
            self._drop(gid)
            return record
        old = self.groups.get(gid) if incremental else None
        self._remember(gid, new)
        if old is None:
            return record
        add, remove = new - old, old - new
        changed = len(add) + len(remove)
        if changed > max(1, len(new)) * MAX_SHARE or changed > p.MAX_DELTA_VALUES:
            return record
        # server order for additions, sorted removals: both deterministic on replay
        return p.member_delta(record, len(old), [m for m in members if m in add], sorted(remove))
