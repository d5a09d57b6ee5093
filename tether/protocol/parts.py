"""A change-stream message larger than a frame, carried as numbered parts.

Why parts and not a larger frame: a group with 100,000 members is one record
of several megabytes, while every tether message stays at most
:data:`~tether.protocol.schema.MAX_FRAME_BYTES`. The agent cuts the message's
JSON text (the exact bytes it would have spooled) into consecutive pieces of
at most :data:`MAX_PART_BYTES` and spools each as its own ``part`` stream
message; ``directory.changes`` carries them like any other entry, so each part
has its own seq and home applies it exactly once. Home keeps the parts it
applied (durably, with its ``applied_through``) and applies the message itself
when the last part arrives. Any other stream message between two parts of one
set means the set was abandoned (the agent replays the stream from its cursor),
and a part 0 starts a new set.

Wire shape (one entry's ``message`` in ``directory.changes``)::

    {"type": "part", "index": 0, "count": 27, "size": 5403321, "text": "{\\"type\\":\\"chunk\\",..."}

``index`` 0..count-1 in order, ``count`` 2..:data:`MAX_PARTS`, ``size`` the
whole message's UTF-8 byte length (at most :data:`MAX_MESSAGE_BYTES`, the same
in every part of a set), ``text`` the piece (at most :data:`MAX_PART_BYTES`
UTF-8 bytes, cut between characters). The joined text is one stream message
(``chunk``, ``begin``, ``end`` or ``error``), never another ``part``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .schema import ErrorCode, ProtocolError

#: ``type`` of a part in the change stream.
PART_TYPE = "part"
#: UTF-8 bytes of one part's ``text``. JSON-escaping can at most double it, so an
#: encoded part stays well inside one spool entry and one frame.
MAX_PART_BYTES = 192 * 1024
#: Largest message carried in parts (about 500,000 member DNs): home holds one set
#: per sending instance, so this bounds its memory and disk per directory.
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
#: Parts of one message (MAX_MESSAGE_BYTES / MAX_PART_BYTES, rounded up).
MAX_PARTS = -(-MAX_MESSAGE_BYTES // MAX_PART_BYTES)


def _bad(detail: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_TYPE, detail)


@dataclass(frozen=True)
class Part:
    """One piece of a message's JSON text; see the module docstring for the rules."""

    index: int
    count: int
    size: int
    text: str

    @property
    def last(self) -> bool:
        return self.index == self.count - 1

    def to_message(self) -> dict:
        return {"type": PART_TYPE, "index": self.index, "count": self.count, "size": self.size,
                "text": self.text}

    @classmethod
    def from_message(cls, message: dict) -> Part:
        """A received part, checked against the limits (:class:`ProtocolError` ``bad_type``)."""
        fields = {}
        for name in ("index", "count", "size"):
            value = message.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise _bad(f"part {name} must be an int >= 0")
            fields[name] = value
        text = message.get("text")
        if not isinstance(text, str):
            raise _bad("part text must be a string")
        if not 2 <= fields["count"] <= MAX_PARTS:
            raise _bad(f"part count {fields['count']} is outside 2..{MAX_PARTS}")
        if fields["index"] >= fields["count"]:
            raise _bad(f"part index {fields['index']} is not below its count {fields['count']}")
        if fields["size"] > MAX_MESSAGE_BYTES:
            raise _bad(f"a message in parts may hold at most {MAX_MESSAGE_BYTES} bytes, "
                       f"not {fields['size']}")
        if len(text) > MAX_PART_BYTES:  # characters <= bytes: a cheap first bound
            raise _bad(f"part text above {MAX_PART_BYTES} bytes")
        return cls(fields["index"], fields["count"], fields["size"], text)


def split(data: bytes, limit: int = MAX_PART_BYTES) -> list[Part]:
    """The parts of one message's UTF-8 JSON `data`; ValueError when it is too large.

    Cuts fall between characters (never inside a UTF-8 sequence), so each
    piece is text on its own.
    """
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(f"{len(data)} bytes, more than the {MAX_MESSAGE_BYTES} a message in "
                         "parts may hold")
    pieces, start = [], 0
    while start < len(data):
        end = min(start + limit, len(data))
        while end < len(data) and (data[end] & 0xC0) == 0x80:
            end -= 1  # a continuation byte: cut before its character
        pieces.append(data[start:end].decode())
        start = end
    return [Part(i, len(pieces), len(data), text) for i, text in enumerate(pieces)]


def join(parts: list[Part]) -> dict:
    """The message a complete, ordered set of parts carries (:class:`ProtocolError` if not)."""
    if not parts or [p.index for p in parts] != list(range(parts[0].count)):
        raise _bad("parts are missing or out of order")
    if any(p.count != parts[0].count or p.size != parts[0].size for p in parts):
        raise _bad("parts of one message disagree on count or size")
    data = "".join(p.text for p in parts).encode()
    if len(data) != parts[0].size:
        raise _bad(f"parts joined to {len(data)} bytes, not the {parts[0].size} announced")
    try:
        message = json.loads(data)
    except ValueError as exc:
        raise _bad(f"parts joined to text that is not JSON ({exc})") from None
    if not isinstance(message, dict) or message.get("type") == PART_TYPE:
        raise _bad("parts must join to one stream message (not to another part)")
    return message
