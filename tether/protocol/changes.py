"""The directory change stream as typed messages: built by the agent, checked by home.

Why here: the agent's sync engines build these messages, its spool keeps them,
``directory.changes`` carries them and home's identity store applies them; the
shape used to be written out as dicts in five agent modules and checked again
in two home modules. Now each message is a dataclass with ``encode`` (the dict
that is spooled and sent) and :func:`decode` (dict -> message, or a
:class:`ProtocolError` ``bad_type``): constructing a message runs the same
checks as decoding one, so the agent cannot build what home refuses.

Three numbers were all called ``seq``; each has its own name here, while the
wire keys stay as they were:

``Message.seq`` (the envelope, :mod:`.codec`)
    a protocol chunk's or ack's place in one streamed answer (``search``).
:attr:`Chunk.number` / :attr:`End.number` (wire key ``seq`` in the message)
    the place of a chunk in one sync stream: 1, 2, ...; the ``end`` takes the
    number after the last chunk. Informative only: home does not rely on it.
:attr:`Entry.position` (wire key ``seq`` of a ``directory.changes`` entry)
    the message's place in the agent's spool: increasing, never reused, applied
    exactly once per (directory, instance); ``applied_through`` and ``after``
    are positions.

A stream is ``begin``, ``chunk``\\ s, ``end``; an ``error`` reports why a stream
stopped or cannot start; a message too large for a frame travels as ``part``\\ s
(:mod:`.parts`). The full contract: ``agent/directory/README.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from .parts import PART_TYPE, Part
from .schema import ErrorCode, ProtocolError

FULL, INCREMENTAL = "full", "incremental"
MODES = (FULL, INCREMENTAL)
#: Every ``type`` a change-stream message may have.
TYPES = frozenset({"begin", "chunk", "end", "error", PART_TYPE})


def _bad(detail: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_TYPE, detail)


@dataclass(frozen=True)
class Begin:
    """A stream starts: a ``full`` one replaces the directory's snapshot at its end.

    A full stream always says why it runs (``reason``, None when home asked for it).
    """

    mode: str
    directory: str | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise _bad(f"begin with mode {self.mode!r}; expected full or incremental")

    def encode(self) -> dict:
        out = {"type": "begin", "mode": self.mode, "directory": self.directory}
        if self.mode == FULL:
            out["reason"] = self.reason
        return out


@dataclass(frozen=True)
class Chunk:
    """Records (upserts with the whole state, or deletes) in stream order."""

    number: int | None
    changes: list

    def __post_init__(self) -> None:
        if not isinstance(self.changes, list):
            raise _bad("chunk without a changes list")

    def encode(self) -> dict:
        return {"type": "chunk", "seq": self.number, "changes": self.changes}


@dataclass(frozen=True)
class End:
    """A stream is complete: ``cursor`` is where the next incremental stream starts.

    ``extra``: what the engine adds for the operator (``server``, ``failovers``).
    """

    mode: str | None
    count: int | None
    cursor: str | None
    number: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cursor is not None and not isinstance(self.cursor, str):
            raise _bad("end with a cursor that is not a string")

    def encode(self) -> dict:
        return {"type": "end", "seq": self.number, "mode": self.mode, "count": self.count,
                "cursor": self.cursor, **self.extra}


@dataclass(frozen=True)
class Error:
    """Why a stream stopped or cannot start; home shows it in ``directory status``.

    ``extra``: ``directory``, ``hint``, ``server`` and whatever else the engine says.
    """

    code: str
    message: str
    at: float | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        shown = str({"code": self.code, "message": self.message, **self.extra})[:200]
        if not (isinstance(self.code, str) and self.code and isinstance(self.message, str)):
            raise _bad(f"error message needs string code and message: {shown}")
        if self.at is not None and (not isinstance(self.at, (int, float))
                                    or isinstance(self.at, bool)):
            raise _bad(f"error message 'at' must be a unix time: {shown}")

    @property
    def hint(self) -> str | None:
        hint = self.extra.get("hint")
        return hint if isinstance(hint, str) else None

    @property
    def server(self) -> str | None:
        server = self.extra.get("server")
        return server if isinstance(server, str) else None

    def encode(self) -> dict:
        return {"type": "error", **self.extra, "code": self.code, "message": self.message,
                "at": self.at}


StreamMessage = Union[Begin, Chunk, End, Error, Part]


def decode(message: dict) -> StreamMessage:
    """The typed form of one stream message; :class:`ProtocolError` ``bad_type`` if invalid.

    Unknown extra keys are kept (``End.extra``, ``Error.extra``) so a newer agent
    can add fields; the checks are those home has always applied.
    """
    kind = message.get("type") if isinstance(message, dict) else None
    if kind == "begin":
        return Begin(message.get("mode"), message.get("directory"), message.get("reason"))
    if kind == "chunk":
        return Chunk(message.get("seq"), message.get("changes"))
    if kind == "end":
        return End(message.get("mode"), message.get("count"), message.get("cursor"),
                   message.get("seq"),
                   {k: v for k, v in message.items()
                    if k not in ("type", "seq", "mode", "count", "cursor")})
    if kind == "error":
        return Error(message.get("code"), message.get("message"), message.get("at"),
                     {k: v for k, v in message.items()
                      if k not in ("type", "code", "message", "at")})
    if kind == PART_TYPE:
        return Part.from_message(message)
    raise _bad(f"stream message type {kind!r}; expected begin, chunk, end or error")


@dataclass(frozen=True)
class Entry:
    """One spooled message in a ``directory.changes`` batch, at its spool ``position``."""

    position: int
    message: dict

    def encode(self) -> dict:
        return {"seq": self.position, "message": self.message}


def check_entries(body: dict) -> list[dict]:
    """A ``directory.changes`` body's entries (as sent), or ``bad_type`` saying what is wrong.

    Checks the batch: positions increase, each message has a stream type, parts
    are well formed, ``after`` is below the first position. Each message's own
    fields are checked by :func:`decode` when it is applied.
    """
    entries = body.get("entries")
    if not isinstance(entries, list):
        raise _bad("entries must be a list of {seq, message}")
    last = None
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise _bad(f"entries[{n}] is not an object")
        position, message = entry.get("seq"), entry.get("message")
        if not _count(position):
            raise _bad(f"entries[{n}].seq must be an int >= 0")
        if last is not None and position <= last:
            raise _bad(f"entries[{n}].seq {position} is not above the previous {last}: "
                       "send spool entries in increasing seq order")
        if not isinstance(message, dict) or message.get("type") not in TYPES:
            raise _bad(f"entries[{n}].message must be a begin, chunk, end or error stream "
                       "message, or a part of one (agent/directory/README.md)")
        if message["type"] == PART_TYPE:
            try:
                Part.from_message(message)
            except ProtocolError as exc:
                raise _bad(f"entries[{n}]: {exc.detail}") from None
        last = position
    after = body.get("after")
    if after is not None and (not _count(after) or (entries and after >= entries[0]["seq"])):
        raise _bad("after must be an int >= 0 below the batch's first seq (the last seq of "
                   "the batch sent before it)")
    return entries


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
