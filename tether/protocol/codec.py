"""One tether message to and from JSON text: strict parsing, envelope and body
validation, and encoding that splices pre-serialised JSON (:class:`RawJSON`)."""

from __future__ import annotations

import enum
import json
import math
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .schema import (_ACK_FIELDS, _ENVELOPE_KEYS, _ERROR_FIELDS, _ID_RE, _NUM, BODY_FIELDS,
                     DEFAULT_LIMIT, MAX_EXTRA_FIELDS, MAX_FRAME_BYTES, MAX_INT, MIN_INT,
                     PROTOCOL_VERSION, STREAM_OPS, SUBPROTOCOL, ErrorCode, Field, Kind, Op,
                     ProtocolError)

@dataclass(frozen=True)
class Message:
    """One decoded, validated tether message (see the package docstring)."""

    id: str
    kind: Kind
    op: Op | None
    ts: float
    body: dict
    re: str | None = None
    seq: int | None = None

    def to_dict(self) -> dict:
        """The JSON object form, envelope keys in a stable order."""
        return {
            "v": PROTOCOL_VERSION, "id": self.id, "kind": self.kind.value,
            "op": self.op.value if self.op is not None else None, "ts": self.ts,
            "re": self.re, "seq": self.seq, "body": self.body,
        }

    @property
    def error_code(self) -> str | None:
        """For an ``error`` message, its code string (may be one we don't know)."""
        return self.body.get("code") if self.kind is Kind.ERROR else None


def new_id() -> str:
    """A random message id: 16 hex chars, unguessable, cheap."""
    return secrets.token_hex(8)



class RawJSON:
    """A body value that is already JSON text, spliced into the frame verbatim.

    Why: the agent's spool holds each directory message as the JSON our own
    encoder wrote; decoding it only to encode it again cost the agent most of
    its drain CPU (100,000 entries per full sync). The sender vouches that the
    text is one JSON value (cheap shape check only); the receiver parses and
    validates the whole frame as always, so a bad splice is refused there.
    """

    __slots__ = ("text",)

    def __init__(self, data: str | bytes) -> None:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        if not isinstance(text, str) or not text.strip():
            raise ProtocolError(ErrorCode.BAD_TYPE, "raw JSON value must be non-empty text")
        self.text = text

    def __len__(self) -> int:
        return len(self.text)


def _dumps(obj: Any) -> str:
    """Compact JSON; :class:`RawJSON` values are spliced in after encoding.

    Each RawJSON becomes a placeholder string holding a fresh random token
    (no body text can forge it), then the placeholders are replaced in one pass.
    """
    raws: list[str] = []
    token = secrets.token_hex(8)

    def placeholder(value: Any) -> str:
        if not isinstance(value, RawJSON):
            raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
        raws.append(value.text)
        return f"\x00{token}:{len(raws) - 1}\x00"

    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                      default=placeholder)
    if not raws:
        return text
    pattern = re.compile(rf'"\\u0000{token}:(\d+)\\u0000"')
    return pattern.sub(lambda m: raws[int(m.group(1))], text)


def encode(message: Message) -> str:
    """Serialize a message; refuses what :func:`decode` would refuse.

    Validation on the way out catches bugs on our side before the peer sees
    them; the result is compact JSON text for one WebSocket text frame.
    """
    oversized_field = None
    try:
        validate(message)
    except ProtocolError as exc:
        if "limit" not in exc.extra:
            raise
        oversized_field = exc  # reported below, unless the whole frame is too large
    try:
        text = _dumps(message.to_dict())
    except (TypeError, ValueError) as exc:
        raise ProtocolError(ErrorCode.BAD_TYPE, f"body is not JSON-serializable: {exc}",
                            message_id=message.id, op=message.op) from None
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise ProtocolError(ErrorCode.BAD_TYPE, "body holds text that is not valid Unicode "
                            "(a lone surrogate); decode bytes properly before sending",
                            message_id=message.id, op=message.op) from None
    if size > MAX_FRAME_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE,
                            f"message exceeds {MAX_FRAME_BYTES} bytes; split it into chunks",
                            message_id=message.id, op=message.op,
                            extra={"limit": MAX_FRAME_BYTES})
    if oversized_field is not None:
        raise oversized_field
    return text


def decode(data: str | bytes | bytearray | memoryview) -> Message:
    """Parse and validate one wire message; :class:`ProtocolError` on anything bad.

    Any input gives either a :class:`Message` or a :class:`ProtocolError`, never
    another exception (the hypothesis fuzz test holds the module to that).
    """
    raw = _to_bytes(data)
    if len(raw) > MAX_FRAME_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE,
                            f"message of {len(raw)} bytes exceeds {MAX_FRAME_BYTES}",
                            extra={"limit": MAX_FRAME_BYTES})
    obj = _parse_json(raw)
    return _from_dict(obj)


def _to_bytes(data: Any) -> bytes:
    """Accept text or binary frames; anything else is a caller bug shown as malformed."""
    if isinstance(data, str):
        if len(data) > MAX_FRAME_BYTES:
            raise ProtocolError(ErrorCode.TOO_LARGE,
                                f"message exceeds {MAX_FRAME_BYTES} bytes",
                                extra={"limit": MAX_FRAME_BYTES})
        try:
            return data.encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError(ErrorCode.MALFORMED, "text is not valid UTF-8") from None
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise ProtocolError(ErrorCode.MALFORMED, f"expected text or bytes, got {type(data).__name__}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    """JSON objects with a repeated key are ambiguous: refuse them.

    Why dict() first: it runs in C, and a full sync decodes ~200,000 objects
    per 100,000 users on home's event loop; the loop only runs on a duplicate.
    """
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return obj


class _OutOfRange(ValueError):
    """A JSON number this protocol does not carry."""


def _bounded_int(text: str) -> int:
    """parse_int hook: integers are signed 64-bit on the wire (SQLite, every peer)."""
    value = int(text)
    if not MIN_INT <= value <= MAX_INT:
        raise _OutOfRange(f"integer {text[:24]}{'...' if len(text) > 24 else ''} is outside "
                         "the signed 64-bit range")
    return value


def _finite_float(text: str) -> float:
    """parse_float hook: 1e400 would silently become inf."""
    value = float(text)
    if not math.isfinite(value):
        raise _OutOfRange(f"number {text[:24]}{'...' if len(text) > 24 else ''} is out of range")
    return value


#: One strict decoder for every message: no NaN/Infinity, no duplicate keys, numbers
#: bounded (the hooks cost about 15 % of decoding a frame of directory records).
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_no_duplicates,
                            parse_int=_bounded_int, parse_float=_finite_float)


def _parse_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(ErrorCode.MALFORMED, "message is not valid UTF-8") from None
    try:
        obj = _DECODER.decode(text)
    except RecursionError:
        raise ProtocolError(ErrorCode.MALFORMED, "JSON nested too deeply") from None
    except _OutOfRange as exc:
        raise ProtocolError(ErrorCode.MALFORMED, f"{exc}; integers are signed 64-bit and "
                            "numbers finite") from None
    except (ValueError, OverflowError) as exc:  # JSONDecodeError, number limits, duplicates
        raise ProtocolError(ErrorCode.MALFORMED, f"not valid JSON: {exc}") from None
    # A lone surrogate can only come from a \\uD800-\\uDFFF escape (strict UTF-8
    # decoding refuses encoded ones); two substring searches keep the common frame fast.
    if ("\\ud" in text or "\\uD" in text) and _has_lone_surrogate(obj):
        raise ProtocolError(ErrorCode.MALFORMED,
                            "a string holds a lone UTF-16 surrogate (\\uD800-\\uDFFF without "
                            "its pair); send valid Unicode text")
    return obj


def _has_lone_surrogate(obj: Any) -> bool:
    """True if any key or string in the decoded tree cannot be encoded as UTF-8."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _from_dict(obj: Any) -> Message:
    """Check the envelope, then build a Message and check its body."""
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.MALFORMED,
                            f"a message is a JSON object, got {type(obj).__name__}")
    msg_id = obj.get("id")
    ident = msg_id if isinstance(msg_id, str) and _ID_RE.match(msg_id) else None
    missing = {"v", "id", "kind", "op", "ts", "body"} - obj.keys()
    if missing:
        raise ProtocolError(ErrorCode.MALFORMED,
                            f"missing envelope field(s): {', '.join(sorted(missing))}",
                            message_id=ident)
    extra = obj.keys() - _ENVELOPE_KEYS
    if extra:
        raise ProtocolError(ErrorCode.MALFORMED,
                            f"unknown envelope field(s): {', '.join(sorted(extra))}",
                            message_id=ident)
    if not _is_int(obj["v"]):
        raise ProtocolError(ErrorCode.BAD_TYPE, "v must be an integer", message_id=ident)
    if obj["v"] != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION,
                            f"protocol version {obj['v']} is not supported; "
                            f"this side speaks {PROTOCOL_VERSION} ({SUBPROTOCOL})",
                            message_id=ident)
    if ident is None:
        raise ProtocolError(ErrorCode.BAD_TYPE,
                            "id must be 1-64 characters of A-Z a-z 0-9 _ . : -")
    kind = _enum(Kind, obj["kind"], "kind", ident)
    op = _parse_op(obj["op"], kind, ident)
    message = Message(id=ident, kind=kind, op=op, ts=_parse_ts(obj["ts"], ident, op),
                      body=obj["body"], re=obj.get("re"), seq=obj.get("seq"))
    validate(message)
    return message


def _parse_op(value: Any, kind: Kind, ident: str) -> Op | None:
    if value is None and kind is Kind.ERROR:
        return None
    if not isinstance(value, str):
        raise ProtocolError(ErrorCode.BAD_TYPE, "op must be a string", message_id=ident)
    try:
        return Op(value)
    except ValueError:
        raise ProtocolError(ErrorCode.UNKNOWN_OP,
                            f"unknown operation {value[:64]!r}; known: "
                            + ", ".join(o.value for o in Op),
                            message_id=ident) from None


def _parse_ts(value: Any, ident: str, op: Op | None) -> float:
    if not isinstance(value, _NUM) or isinstance(value, bool):
        raise ProtocolError(ErrorCode.BAD_TYPE, "ts must be a number (Unix seconds)",
                            message_id=ident, op=op)
    try:
        ts = float(value)
    except OverflowError:
        ts = math.inf
    if not math.isfinite(ts) or ts < 0:
        raise ProtocolError(ErrorCode.BAD_TYPE, "ts must be a finite, non-negative number",
                            message_id=ident, op=op)
    return ts


def _enum(cls: type[enum.Enum], value: Any, name: str, ident: str | None) -> Any:
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        return cls(value)
    except ValueError:
        choices = ", ".join(member.value for member in cls)
        raise ProtocolError(ErrorCode.BAD_TYPE, f"{name} must be one of: {choices}",
                            message_id=ident) from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate(message: Message) -> None:
    """Check every field of a Message: envelope rules per kind, then the body."""
    ident, op, kind = message.id, message.op, message.kind

    def bad(detail: str) -> ProtocolError:
        return ProtocolError(ErrorCode.BAD_TYPE, detail, message_id=ident, op=op)

    if not isinstance(ident, str) or not _ID_RE.match(ident):
        raise bad("id must be 1-64 characters of A-Z a-z 0-9 _ . : -")
    if not isinstance(kind, Kind):
        raise bad("kind must be a Kind")
    if op is None and kind is not Kind.ERROR:
        raise bad("op may only be null on an error")
    if op is not None and not isinstance(op, Op):
        raise bad("op must be an Op")
    if not isinstance(message.body, dict):
        raise bad("body must be a JSON object")
    needs_re = kind in (Kind.RESPONSE, Kind.CHUNK, Kind.ACK)
    if message.re is not None and (not isinstance(message.re, str) or not _ID_RE.match(message.re)):
        raise bad("re must be a message id or null")
    if needs_re and message.re is None:
        raise bad(f"a {kind.value} must name its request in re")
    if kind in (Kind.REQUEST, Kind.EVENT) and message.re is not None:
        raise bad(f"a {kind.value} must have re null")
    if kind in (Kind.CHUNK, Kind.ACK):
        if not _is_int(message.seq) or message.seq < 0:
            raise bad(f"a {kind.value} needs seq, an integer >= 0")
        if op not in STREAM_OPS:
            raise bad(f"{op.value} does not stream; chunks/acks only for "
                      + ", ".join(o.value for o in STREAM_OPS))
    elif message.seq is not None:
        raise bad(f"a {kind.value} must have seq null")
    _validate_body(message, bad)


def _validate_body(message: Message, bad: Callable[[str], ProtocolError]) -> None:
    kind, body = message.kind, message.body
    if kind is Kind.ERROR:
        spec = _ERROR_FIELDS
    elif kind is Kind.ACK:
        spec = _ACK_FIELDS
    else:
        spec = BODY_FIELDS.get((message.op, kind), {})
    named = 0
    for name, field_spec in spec.items():
        if name == "*":
            continue
        types, required, limit = _field(field_spec)
        if name not in body:
            if required:
                raise bad(f"{message.op.value if message.op else 'error'} {kind.value} "
                          f"body needs field {name!r}")
            continue
        named += 1
        value = body[name]
        if not _type_ok(value, types):
            names = "/".join("null" if t is None else t.__name__ for t in types)
            raise bad(f"body field {name!r} must be {names}")
        _check_size(name, value, limit, bad)
    if len(body) == named:
        return
    extra_limit = _field(spec["*"]).limit if "*" in spec else DEFAULT_LIMIT
    if extra_limit is None:
        return
    extras = [name for name in body if name not in spec]
    if len(extras) > MAX_EXTRA_FIELDS:
        raise bad(f"body has {len(extras)} unknown fields; at most {MAX_EXTRA_FIELDS}")
    for name in extras:
        if len(name) > DEFAULT_LIMIT:
            raise bad(f"a body field name is {len(name)} characters; at most {DEFAULT_LIMIT}")
        _check_size(name, body[name], extra_limit, bad)


def _field(spec: Any) -> Field:
    """A table entry as a :class:`Field` (a bare ``(types, required)`` pair gets the
    default limit, so a row written the old way is still bounded)."""
    return spec if isinstance(spec, Field) else Field(*spec)


def _check_size(name: str, value: Any, limit: int | None,
                bad: Callable[[str], ProtocolError]) -> None:
    """Characters of a string, bytes of compact JSON of a list or object."""
    if limit is None:
        return
    if isinstance(value, str):
        if len(value) > limit:
            raise _too_big(bad, name, f"{len(value)} characters", limit, "characters")
    elif isinstance(value, (list, dict)):
        # A cheap lower bound first: each item takes at least two bytes of JSON.
        if 2 * len(value) > limit:
            raise _too_big(bad, name, f"{len(value)} items", limit, "bytes of JSON")
        try:
            size = len(json.dumps(value, separators=(",", ":")))
        except (TypeError, ValueError, RecursionError):
            raise bad(f"body field {name!r} is not JSON-serializable") from None
        if size > limit:
            raise _too_big(bad, name, f"{size} bytes of JSON", limit, "bytes of JSON")


def _too_big(bad: Callable[[str], ProtocolError], name: str, size: str, limit: int,
             unit: str) -> ProtocolError:
    exc = bad(f"body field {name[:64]!r} is {size}; at most {limit} {unit}")
    exc.extra["limit"] = limit
    return exc


def _type_ok(value: Any, types: tuple) -> bool:
    if value is None:
        return None in types
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and not MIN_INT <= value <= MAX_INT:
        return False  # our own encoder refuses what the peer's decoder would
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return any(t is not None and t is not bool and isinstance(value, t) for t in types)


