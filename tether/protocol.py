"""The tether wire protocol (agent ⇄ home), version 1: one module both sides import.

Shaped like python-websockets' ``protocol.py``: a *sans-I/O* state machine. Text
goes in (:meth:`Session.receive`), events come out (:meth:`Session.events_received`)
and text to send piles up (:meth:`Session.data_to_send`); no sockets, no asyncio.
The I/O layers on each side (home's server, the agent's dialer) are thin loops
around a :class:`Session`, so the rules below are tested without any network.

Transport
=========

WebSocket over TLS 1.3, subprotocol :data:`SUBPROTOCOL` (``"tether.v1"``): the
version is negotiated by the subprotocol name and repeated in every envelope
(``"v"``). One WebSocket text message carries exactly one tether message of at
most :data:`MAX_FRAME_BYTES` bytes of UTF-8 JSON (both ends set websockets'
``max_size`` to that value as well).

Envelope
========

Every message is a JSON object::

    {"v": 1, "id": "5f0c...", "kind": "request", "op": "hello",
     "ts": 1764100000.25, "re": null, "seq": null, "body": {...}}

``v``
    int, :data:`PROTOCOL_VERSION`; any other value is refused with
    ``unsupported_version``.
``id``
    str, 1..64 chars of ``[A-Za-z0-9_.:-]``, unique per connection and sender.
    A second message with an id already seen is refused with ``replay``.
``kind``
    one of :class:`Kind`: ``request``, ``response``, ``error``, ``chunk``,
    ``ack``, ``event``.
``op``
    one of :class:`Op`. Responses, errors, chunks and acks repeat the op of the
    request they belong to. Only an ``error`` about a message that could not be
    parsed may carry ``op: null``.
``ts``
    number, sender's Unix time in seconds (float). A message more than
    :data:`DEFAULT_WINDOW_SECONDS` away from the receiver's clock (after the
    session's clock offset) is refused with ``stale``; the error body then
    carries ``server_time`` so the peer can correct its offset.
``re``
    str or null: for ``response``, ``error``, ``chunk`` and ``ack`` the ``id`` of
    the request they answer (an ``error`` about an unparseable message has
    ``re: null``); must be null for ``request`` and ``event``.
``seq``
    int >= 0 for ``chunk`` (0, 1, 2... per request) and ``ack`` (cumulative:
    "every chunk up to and including ``seq`` is stored"); null otherwise.
``body``
    JSON object; its fields per op and kind are documented in :class:`Op` and
    checked by :data:`BODY_FIELDS` (unknown extra fields are allowed so that a
    newer peer can add optional fields without a version bump).

Conversation
============

1. The agent opens the socket and sends ``hello`` (request). Home answers with
   a ``hello`` response or an ``error``. Nothing else may be sent or received
   before the hello response: home answers any other message with
   ``not_hello``; the agent's :class:`Session` refuses to send anything else.
2. A connection authenticated by an *image* certificate may then only
   ``enroll``; one authenticated by an *instance* certificate may use all the
   other operations (home answers ``unauthorized`` otherwise).
3. Requests flow both ways, each answered by exactly one ``response`` or
   ``error`` with ``re`` = request id. Streaming operations (``sync``,
   ``search``) send ``chunk`` messages (``seq`` 0, 1, ...) before the final
   response; the requester acknowledges them with ``ack`` once it has stored
   them, and the streaming side keeps at most :data:`STREAM_WINDOW` chunks
   unacknowledged. Each sync chunk carries a ``cursor``: a new ``sync``
   request with the last acknowledged cursor resumes where a lost connection
   stopped.
4. ``event`` messages (``heartbeat``, ``config.ack``) are one-way; they get no
   reply unless they are invalid.

5. A requester that gives up (timeout, consumer gone) sends an ``error`` with
   code ``cancelled`` and ``re`` = its own request id (:meth:`Session.cancel`);
   the answering side gets :class:`CancelReceived`, should stop working on it,
   and must not answer it any more (its Session refuses to).

Errors never cause an error reply (no ping-pong), and a protocol violation
never closes the session by itself: the peer gets an ``error`` message with a
specific :class:`ErrorCode` and the I/O layer logs the :class:`ProtocolViolation`
event (it may drop a connection that keeps violating, see
:attr:`Session.violations`).
"""

from __future__ import annotations

import enum
import json
import math
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable

PROTOCOL_VERSION = 1
SUBPROTOCOL = f"tether.v{PROTOCOL_VERSION}"
#: Largest tether message (one WebSocket message), bytes of UTF-8 JSON.
MAX_FRAME_BYTES = 1024 * 1024
#: Accepted distance between a message's ``ts`` and the receiver's clock.
DEFAULT_WINDOW_SECONDS = 300.0
#: Chunks a streaming side may have in flight before it waits for an ``ack``.
STREAM_WINDOW = 8
#: Message ids remembered per connection for replay detection (memory bound).
MAX_SEEN_IDS = 65536
#: Seconds between agent heartbeats that home asks for in the hello response.
HEARTBEAT_SECONDS = 30

_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_ENVELOPE_KEYS = frozenset({"v", "id", "kind", "op", "ts", "re", "seq", "body"})


class Kind(str, enum.Enum):
    """What a message is, relative to the request/response conversation."""

    REQUEST = "request"
    RESPONSE = "response"
    ERROR = "error"
    CHUNK = "chunk"
    ACK = "ack"
    EVENT = "event"


class Op(str, enum.Enum):
    """Operation names. Direction: A→H agent to home, H→A home to agent.

    ``hello`` (request A→H, first message on every connection)
        body: ``agent_version`` str, ``image_id`` str, ``instance_id`` str|null
        (null before enrollment), ``machine`` object (``platform``,
        ``fingerprint``, ``fingerprint_source``), ``selfcheck`` object (the
        agent's self-check report: ``verdict`` "ok"|"degraded", figures,
        ``shortfalls`` list), ``listening`` list (the agent process's own
        listening sockets, expected empty), ``socket_index`` int (which of the
        agent's parallel sockets this is), ``config_version`` int|null (the
        configuration the agent runs from).
        response: ``home_version`` str, ``server_time`` float, ``role``
        "image"|"instance", ``connector`` str, ``instance_id`` str|null,
        ``heartbeat_seconds`` int, ``config_version`` int|null (newest
        configuration home has for the connector; home pushes it if newer),
        ``config_key_pem`` str (home's Ed25519 config-verification key, see
        :mod:`tether.configsig`).
    ``enroll`` (request A→H, image-certificate connections only)
        body: ``csr_pem`` str (PEM CSR of the instance's signing key; the key
        never leaves the machine), ``sealing_public_key`` str (the instance's
        X25519 key, ``tether.sealing.public_key_text``), ``machine`` object
        (``fingerprint`` str required: DMI product UUID or EC2 instance id).
        response: ``instance_id`` str, ``cert_pem`` str, ``ca_pem`` str,
        ``not_after`` float (Unix time), ``renew_after`` float,
        ``config_key_pem`` str. After enrolling, the agent reconnects with the
        instance certificate.
        errors: ``clone_refused`` (the connector's max-instances is reached by
        other machines), ``bad_csr``, ``unauthorized``.
    ``renew`` (request A→H, instance connections)
        body: ``csr_pem`` str (same key or a new one). response: as ``enroll``.
    ``heartbeat`` (event A→H)
        body: ``uptime`` float, optional ``selfcheck`` object, ``listening``
        list, ``config_version`` int|null, ``draining`` bool (true: this socket
        is being rotated out; home sends it no new requests).
    ``config.push`` (request H→A)
        body: ``config`` object, a signed document from
        :func:`tether.configsig.sign_config` (secrets inside sealed to the
        instance with :mod:`tether.sealing`).
        response: ``version`` int, ``applied`` bool.
        errors: ``bad_signature``, ``stale_config`` (older than the running
        one), ``bad_config``.
    ``config.ack`` (event A→H)
        body: ``version`` int|null (configuration now in use), ``status``
        "applied"|"rejected"|"last_good", optional ``error`` str (an
        :class:`ErrorCode` value) and ``detail`` str. Sent after hello and after
        every change, so home always knows what runs.
    ``sync`` (request H→A)
        Home tells a connector what to do with one directory's change feed.
        body: ``directory`` str (the directory's ``id`` in the configuration),
        ``mode`` "follow" (lead this directory: sync and follow its changes
        into the on-disk spool, draining it home with ``directory.changes``;
        ``cursor`` is home's last applied cursor, used only when the agent is
        not already following and holds no unsent spool for it), "full" (as
        follow, but start with a full sync now), "stop" (stop following; the
        spool is kept and still drained), ``cursor`` str|null.
        response: ``cursor`` str|null (the agent's own cursor), ``following``
        bool, ``pending`` int (spooled messages not yet acknowledged).
        Chunks are not used by this version (the schema stays for streaming
        peers); changes travel through ``directory.changes`` so they are spooled.
    ``directory.changes`` (request A→H)
        The agent drains its spool: body ``directory`` str, ``entries`` list of
        ``{"seq": int, "message": object}`` in spool order (``message`` is one
        stream message of the directory engine: begin / chunk / end / error, see
        agent/directory/README.md), at most :data:`MAX_FRAME_BYTES` in all,
        optional ``after`` int|null: the last seq of the batch sent just before
        this one (the agent keeps a few batches in flight); home applies this
        batch only once every seq up to ``after`` is applied, else applies
        nothing and answers its unchanged ``applied_through``, so a batch never
        lands without the one before it (``after`` absent or null: no such
        condition, e.g. the first batch after a reconnect).
        response: ``applied_through`` int (every seq up to it is applied, or was
        dropped on purpose: the agent acknowledges its spool up to it),
        ``leader`` bool (false: home takes this directory's changes from another
        connector and dropped the batch; the agent stops following it).
        Home applies each seq exactly once per instance and directory.
    ``search`` (request H→A, streamed)
        body: ``directory`` str, ``kind`` "user"|"group", ``filter`` str,
        optional ``limit`` int. chunk body: ``entries`` list of records.
        response: ``entries`` int, ``truncated`` bool.
    ``authenticate`` (request H→A)
        body: ``directory`` str, ``username`` str, ``password`` str.
        response: ``ok`` bool, ``outcome`` str (success|wrong_password|
        disabled|locked|expired|unknown_user), ``dn`` str|null, ``groups``
        list (DNs, nested groups resolved), ``server`` str.
    ``provision`` (request H→A)
        body: ``directory`` str, ``order`` object (``id`` str, ``op`` one of
        create_user|update_user|move_user|disable_user|enable_user|delete_user|
        set_password|add_member|remove_member, and the op's fields, see
        agent/directory/provision.py).
        response: ``ok`` bool, ``result`` object (``id``, ``op``, ``status``
        "done"|"failed", ``reason``, ``code``, ``server_code``, and
        ``outcome_unknown`` true when the connection dropped after the write was
        sent). Never retried on another connector by home.
    ``update`` (request H→A)
        body: ``version`` str, ``url`` str, ``sha256`` str, ``signature`` str.
        response: ``accepted`` bool, ``detail`` str.
    ``status`` (request, either way)
        body: {} . response: the peer's status report (free-form object).
    """

    HELLO = "hello"
    ENROLL = "enroll"
    RENEW = "renew"
    HEARTBEAT = "heartbeat"
    CONFIG_PUSH = "config.push"
    CONFIG_ACK = "config.ack"
    SYNC = "sync"
    DIRECTORY_CHANGES = "directory.changes"
    SEARCH = "search"
    AUTHENTICATE = "authenticate"
    PROVISION = "provision"
    UPDATE = "update"
    STATUS = "status"


class ErrorCode(str, enum.Enum):
    """Every error a peer can receive. The ``error`` body is
    ``{"code": <value>, "detail": "<what happened and what to do>"}`` plus
    optional fields (``server_time`` for ``stale``, ``limit`` for
    ``too_large`` and ``clone_refused``)."""

    # Envelope / session level (raised by this module).
    MALFORMED = "malformed"              # not UTF-8, not JSON, not an object, missing field
    BAD_TYPE = "bad_type"                # a field has the wrong type or value
    UNKNOWN_OP = "unknown_op"            # op is not an Op
    WRONG_DIRECTION = "wrong_direction"  # op/kind not served by this side
    TOO_LARGE = "too_large"              # message above MAX_FRAME_BYTES
    UNSUPPORTED_VERSION = "unsupported_version"
    NOT_HELLO = "not_hello"              # anything before the hello exchange
    DUPLICATE_HELLO = "duplicate_hello"
    REPLAY = "replay"                    # message id seen before on this connection
    STALE = "stale"                      # ts outside the window
    UNKNOWN_REQUEST = "unknown_request"  # re= names no open request
    BAD_SEQUENCE = "bad_sequence"        # chunk/ack seq out of order
    # Application level (raised by home or the agent).
    UNAUTHORIZED = "unauthorized"        # this certificate may not do that
    REVOKED = "revoked"
    CLONE_REFUSED = "clone_refused"
    BAD_CSR = "bad_csr"
    BAD_SIGNATURE = "bad_signature"
    STALE_CONFIG = "stale_config"
    BAD_CONFIG = "bad_config"
    NOT_FOUND = "not_found"
    UNAVAILABLE = "unavailable"          # no agent connected / directory down
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"              # the requester withdrew its request
    BUSY = "busy"
    INTERNAL = "internal"


#: Ops a home accepts as requests / events, and ops an agent accepts.
HOME_REQUESTS = frozenset({Op.HELLO, Op.ENROLL, Op.RENEW, Op.STATUS,
                           Op.DIRECTORY_CHANGES})
HOME_EVENTS = frozenset({Op.HEARTBEAT, Op.CONFIG_ACK})
AGENT_REQUESTS = frozenset({
    Op.CONFIG_PUSH, Op.SYNC, Op.SEARCH, Op.AUTHENTICATE, Op.PROVISION,
    Op.UPDATE, Op.STATUS,
})
AGENT_EVENTS: frozenset[Op] = frozenset()
#: Ops whose answers may be streamed as chunks.
STREAM_OPS = frozenset({Op.SYNC, Op.SEARCH})

_ANY = object()
_NUM = (int, float)
#: (op, kind) -> {field: (types, required)}; ``None`` in types allows null.
BODY_FIELDS: dict[tuple[Op, Kind], dict[str, tuple[tuple, bool]]] = {
    (Op.HELLO, Kind.REQUEST): {
        "agent_version": ((str,), True),
        "image_id": ((str,), True),
        "instance_id": ((str, None), False),
        "machine": ((dict,), False),
        "selfcheck": ((dict,), False),
        "listening": ((list,), False),
        "socket_index": ((int,), False),
        "config_version": ((int, None), False),
    },
    (Op.HELLO, Kind.RESPONSE): {
        "home_version": ((str,), True),
        "server_time": (_NUM, True),
        "role": ((str,), True),
        "connector": ((str,), True),
        "instance_id": ((str, None), False),
        "heartbeat_seconds": ((int,), False),
        "config_version": ((int, None), False),
        "config_key_pem": ((str,), False),
    },
    (Op.ENROLL, Kind.REQUEST): {
        "csr_pem": ((str,), True),
        "sealing_public_key": ((str,), True),
        "machine": ((dict,), True),
    },
    (Op.ENROLL, Kind.RESPONSE): {
        "instance_id": ((str,), True),
        "cert_pem": ((str,), True),
        "ca_pem": ((str,), True),
        "not_after": (_NUM, True),
        "renew_after": (_NUM, False),
        "config_key_pem": ((str,), False),
    },
    (Op.RENEW, Kind.REQUEST): {"csr_pem": ((str,), True)},
    (Op.RENEW, Kind.RESPONSE): {
        "instance_id": ((str,), True),
        "cert_pem": ((str,), True),
        "ca_pem": ((str,), True),
        "not_after": (_NUM, True),
        "renew_after": (_NUM, False),
    },
    (Op.HEARTBEAT, Kind.EVENT): {
        "uptime": (_NUM, False),
        "selfcheck": ((dict,), False),
        "listening": ((list,), False),
        "config_version": ((int, None), False),
        "draining": ((bool,), False),
    },
    (Op.CONFIG_PUSH, Kind.REQUEST): {"config": ((dict,), True)},
    (Op.CONFIG_PUSH, Kind.RESPONSE): {
        "version": ((int,), True),
        "applied": ((bool,), True),
    },
    (Op.CONFIG_ACK, Kind.EVENT): {
        "version": ((int, None), True),
        "status": ((str,), True),
        "error": ((str,), False),
        "detail": ((str,), False),
    },
    (Op.SYNC, Kind.REQUEST): {
        "directory": ((str,), True),
        "mode": ((str,), True),
        "cursor": ((str, None), False),
    },
    (Op.SYNC, Kind.CHUNK): {
        "changes": ((list,), True),
        "cursor": ((str,), True),
    },
    (Op.SYNC, Kind.RESPONSE): {
        "cursor": ((str, None), True),
        "chunks": ((int,), False),
        "changes": ((int,), False),
        "following": ((bool,), False),
        "pending": ((int,), False),
    },
    (Op.DIRECTORY_CHANGES, Kind.REQUEST): {
        "directory": ((str,), True),
        "entries": ((list,), True),
        "after": ((int, None), False),
    },
    (Op.DIRECTORY_CHANGES, Kind.RESPONSE): {
        "applied_through": ((int,), True),
        "leader": ((bool,), True),
    },
    (Op.SEARCH, Kind.REQUEST): {
        "directory": ((str,), True),
        "filter": ((str,), True),
        "kind": ((str,), False),
        "limit": ((int,), False),
        "base": ((str, None), False),
        "scope": ((str,), False),
        "attributes": ((list,), False),
    },
    (Op.SEARCH, Kind.CHUNK): {"entries": ((list,), True)},
    (Op.AUTHENTICATE, Kind.REQUEST): {
        "directory": ((str,), True),
        "username": ((str,), True),
        "password": ((str,), True),
    },
    (Op.AUTHENTICATE, Kind.RESPONSE): {
        "ok": ((bool,), True),
        "outcome": ((str,), False),
        "dn": ((str, None), False),
        "groups": ((list,), False),
        "server": ((str, None), False),
    },
    (Op.PROVISION, Kind.REQUEST): {
        "directory": ((str,), True),
        "order": ((dict,), True),
    },
    (Op.PROVISION, Kind.RESPONSE): {
        "ok": ((bool,), True),
        "result": ((dict,), False),
    },
    (Op.UPDATE, Kind.REQUEST): {
        "version": ((str,), True),
        "url": ((str,), True),
        "sha256": ((str,), True),
        "signature": ((str,), True),
    },
}
_ERROR_FIELDS = {"code": ((str,), True), "detail": ((str,), True)}
_ACK_FIELDS = {"cursor": ((str, None), False)}


class ProtocolError(Exception):
    """A message broke the protocol. ``code`` is an :class:`ErrorCode`;
    ``message_id``/``op`` identify the offending message when it got that far
    (so the error reply can say ``re``)."""

    def __init__(self, code: ErrorCode, detail: str, *, message_id: str | None = None,
                 op: Op | None = None, extra: dict | None = None) -> None:
        super().__init__(f"{code.value}: {detail}")
        self.code = code
        self.detail = detail
        self.message_id = message_id
        self.op = op
        self.extra = dict(extra or {})


@dataclass(frozen=True)
class Message:
    """One decoded, validated tether message (see the module docstring)."""

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


# --------------------------------------------------------------------------- codec


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
    validate(message)
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


#: One strict decoder for every message (no NaN/Infinity, no duplicate keys).
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)


def _parse_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(ErrorCode.MALFORMED, "message is not valid UTF-8") from None
    try:
        return _DECODER.decode(text)
    except RecursionError:
        raise ProtocolError(ErrorCode.MALFORMED, "JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, int digit limits, duplicates
        raise ProtocolError(ErrorCode.MALFORMED, f"not valid JSON: {exc}") from None


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
    ts = float(value)
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
    kind = message.kind
    if kind is Kind.ERROR:
        spec = _ERROR_FIELDS
    elif kind is Kind.ACK:
        spec = _ACK_FIELDS
    else:
        spec = BODY_FIELDS.get((message.op, kind), {})
    for name, (types, required) in spec.items():
        if name not in message.body:
            if required:
                raise bad(f"{message.op.value if message.op else 'error'} {kind.value} "
                          f"body needs field {name!r}")
            continue
        if not _type_ok(message.body[name], types):
            names = "/".join("null" if t is None else t.__name__ for t in types)
            raise bad(f"body field {name!r} must be {names}")


def _type_ok(value: Any, types: tuple) -> bool:
    if value is None:
        return None in types
    if isinstance(value, bool):
        return bool in types
    return any(t is not None and t is not bool and isinstance(value, t) for t in types)


# ----------------------------------------------------------------------- session


class Role(str, enum.Enum):
    """Which end of the socket a Session is."""

    HOME = "home"    # accepts the socket, waits for hello
    AGENT = "agent"  # dials, sends hello


@dataclass(frozen=True)
class RequestReceived:
    """The peer asks something; answer with :meth:`Session.respond` or :meth:`Session.fail`."""

    message: Message


@dataclass(frozen=True)
class ResponseReceived:
    """The final answer to one of our requests (``request`` is what we sent)."""

    message: Message
    request: Message


@dataclass(frozen=True)
class ErrorReceived:
    """The peer refused something; ``request`` is ours when ``re`` names one."""

    message: Message
    request: Message | None

    @property
    def code(self) -> str:
        return str(self.message.body.get("code"))


@dataclass(frozen=True)
class CancelReceived:
    """The peer withdrew ``request`` (one it sent us): stop serving it, do not answer."""

    message: Message
    request: Message


@dataclass(frozen=True)
class ChunkReceived:
    """One streamed piece of the answer to ``request``; ack it when stored."""

    message: Message
    request: Message


@dataclass(frozen=True)
class AckReceived:
    """The peer stored our chunks up to ``message.seq`` (frees stream window)."""

    message: Message


@dataclass(frozen=True)
class EventReceived:
    """A one-way notice from the peer (heartbeat, config.ack)."""

    message: Message


@dataclass(frozen=True)
class ProtocolViolation:
    """The peer sent something invalid; an error reply is already queued
    (unless the offending message was itself an error or response)."""

    error: ProtocolError


Event = (RequestReceived | ResponseReceived | ErrorReceived | CancelReceived | ChunkReceived
         | AckReceived | EventReceived | ProtocolViolation)


@dataclass
class _Outgoing:
    """A request we sent and are waiting on."""

    request: Message
    next_seq: int = 0


@dataclass
class _Incoming:
    """A request the peer sent and we have not finished answering."""

    request: Message
    next_seq: int = 0
    acked: int = -1


@dataclass
class Session:
    """Sans-I/O state of one tether connection (one WebSocket).

    Feed every received WebSocket message to :meth:`receive`, then handle
    :meth:`events_received`; send everything :meth:`data_to_send` returns.
    ``clock`` is injectable so tests can move time; ``clock_offset`` is added to
    it (an agent whose hello was refused as ``stale`` sets it from the error's
    ``server_time``).
    """

    role: Role
    clock: Callable[[], float] = time.time
    clock_offset: float = 0.0
    window: float = DEFAULT_WINDOW_SECONDS
    id_factory: Callable[[], str] = new_id
    established: bool = False
    violations: int = 0
    _events: list = field(default_factory=list, repr=False)
    _outbox: list = field(default_factory=list, repr=False)
    _seen: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _outgoing: dict = field(default_factory=dict, repr=False)
    _incoming: dict = field(default_factory=dict, repr=False)
    _hello_sent: str | None = field(default=None, repr=False)
    _hello_received: str | None = field(default=None, repr=False)

    # ---- time

    def now(self) -> float:
        """The local clock, corrected by the offset learned from the peer."""
        return self.clock() + self.clock_offset

    # ---- output side

    def data_to_send(self) -> list[str]:
        """Wire texts queued since the last call, in order (one WebSocket message each)."""
        out, self._outbox = self._outbox, []
        return out

    def events_received(self) -> list[Event]:
        """Events produced since the last call, in order."""
        out, self._events = self._events, []
        return out

    def _queue(self, message: Message) -> Message:
        self._outbox.append(encode(message))
        return message

    def _make(self, kind: Kind, op: Op | None, body: dict | None, *, re: str | None = None,
              seq: int | None = None) -> Message:
        return Message(id=self.id_factory(), kind=kind, op=op, ts=self.now(),
                       body=dict(body or {}), re=re, seq=seq)

    def request(self, op: Op, body: dict | None = None) -> Message:
        """Queue a request; its answer arrives as ResponseReceived/ErrorReceived."""
        op = Op(op)
        self._check_may_send(op, Kind.REQUEST)
        message = self._queue(self._make(Kind.REQUEST, op, body))
        self._outgoing[message.id] = _Outgoing(message)
        if op is Op.HELLO:
            self._hello_sent = message.id
        return message

    def event(self, op: Op, body: dict | None = None) -> Message:
        """Queue a one-way event (heartbeat, config.ack)."""
        op = Op(op)
        self._check_may_send(op, Kind.EVENT)
        return self._queue(self._make(Kind.EVENT, op, body))

    def respond(self, request: Message | str, body: dict | None = None) -> Message:
        """Queue the final answer to a request the peer sent; closes its stream."""
        state = self._open_incoming(request)
        message = self._queue(self._make(Kind.RESPONSE, state.request.op, body,
                                         re=state.request.id))
        del self._incoming[state.request.id]
        if state.request.op is Op.HELLO and self.role is Role.HOME:
            self.established = True
        return message

    def fail(self, request: Message | str | None, code: ErrorCode, detail: str,
             **extra: Any) -> Message:
        """Queue an error answer (to an open request, or a free-standing error)."""
        code = ErrorCode(code)
        state = None
        if request is not None:
            key = request.id if isinstance(request, Message) else request
            state = self._incoming.pop(key, None)
            if state is not None and key == self._hello_received and not self.established:
                self._hello_received = None  # a refused hello may be retried
        op = state.request.op if state else (request.op if isinstance(request, Message) else None)
        re = request.id if isinstance(request, Message) else request
        body = {"code": code.value, "detail": detail, **extra}
        return self._queue(self._make(Kind.ERROR, op, body, re=re))

    def chunk(self, request: Message | str, body: dict) -> Message:
        """Queue the next chunk of a streamed answer; check :meth:`stream_credit` first."""
        state = self._open_incoming(request)
        if state.request.op not in STREAM_OPS:
            raise ProtocolError(ErrorCode.WRONG_DIRECTION,
                                f"{state.request.op.value} answers are not streamed")
        if self.stream_credit(state.request.id) <= 0:
            raise ProtocolError(ErrorCode.BUSY,
                                f"{STREAM_WINDOW} chunks unacknowledged; wait for an ack")
        message = self._queue(self._make(Kind.CHUNK, state.request.op, body,
                                         re=state.request.id, seq=state.next_seq))
        state.next_seq += 1
        return message

    def stream_credit(self, request: Message | str) -> int:
        """How many more chunks may be sent before the peer acknowledges."""
        state = self._open_incoming(request)
        return STREAM_WINDOW - (state.next_seq - 1 - state.acked)

    def ack(self, chunk: Message, body: dict | None = None) -> Message:
        """Acknowledge a received chunk (and all before it) once it is stored."""
        if chunk.kind is not Kind.CHUNK or chunk.re is None:
            raise ProtocolError(ErrorCode.BAD_TYPE, "only chunks are acknowledged")
        return self._queue(self._make(Kind.ACK, chunk.op, body, re=chunk.re, seq=chunk.seq))

    def pending(self) -> list[Message]:
        """Our requests still waiting for an answer (e.g. to fail them on disconnect)."""
        return [state.request for state in self._outgoing.values()]

    def forget(self, request_id: str) -> None:
        """Stop waiting for a request locally; a late answer then gets ``unknown_request``."""
        self._outgoing.pop(request_id, None)

    def cancel(self, request_id: str, detail: str = "the requester gave up") -> Message | None:
        """Withdraw one of our open requests and tell the peer (``cancelled`` error)."""
        state = self._outgoing.pop(request_id, None)
        if state is None:
            return None
        body = {"code": ErrorCode.CANCELLED.value, "detail": detail}
        return self._queue(self._make(Kind.ERROR, state.request.op, body, re=request_id))

    def is_open(self, request: Message | str) -> bool:
        """True while a request from the peer still awaits our answer (not cancelled)."""
        key = request.id if isinstance(request, Message) else request
        return key in self._incoming

    def _open_incoming(self, request: Message | str) -> _Incoming:
        key = request.id if isinstance(request, Message) else request
        state = self._incoming.get(key)
        if state is None:
            raise ProtocolError(ErrorCode.UNKNOWN_REQUEST,
                                f"no open request {key!r} from the peer to answer")
        return state

    def _check_may_send(self, op: Op, kind: Kind) -> None:
        """Local guard: the agent says hello first and only sends what home serves."""
        served = (HOME_REQUESTS if kind is Kind.REQUEST else HOME_EVENTS) \
            if self.role is Role.AGENT else \
            (AGENT_REQUESTS if kind is Kind.REQUEST else AGENT_EVENTS)
        if op not in served:
            raise ProtocolError(ErrorCode.WRONG_DIRECTION,
                                f"the {('home' if self.role is Role.AGENT else 'agent')} "
                                f"does not accept {op.value} {kind.value}s")
        if self.established:
            if op is Op.HELLO:
                raise ProtocolError(ErrorCode.DUPLICATE_HELLO, "hello was already exchanged")
            return
        if self.role is Role.AGENT and op is Op.HELLO and self._hello_sent is None:
            return
        raise ProtocolError(ErrorCode.NOT_HELLO,
                            "the hello exchange must complete before anything else")

    # ---- input side

    def receive(self, data: str | bytes) -> None:
        """Process one received WebSocket message; results via :meth:`events_received`."""
        try:
            message = decode(data)
        except ProtocolError as exc:
            self._violation(exc, reply=True)
            return
        try:
            self._check_fresh(message)
            self._dispatch(message)
        except ProtocolError as exc:
            if exc.message_id is None:
                exc.message_id, exc.op = message.id, message.op
            replyable = message.kind not in (Kind.ERROR, Kind.RESPONSE, Kind.ACK)
            self._violation(exc, reply=replyable or exc.code is ErrorCode.UNKNOWN_REQUEST)

    def _violation(self, exc: ProtocolError, *, reply: bool) -> None:
        self.violations += 1
        self._events.append(ProtocolViolation(exc))
        if not reply:
            return
        body = {"code": exc.code.value, "detail": exc.detail, **exc.extra}
        if exc.code is ErrorCode.STALE:
            body["server_time"] = self.now()
        self._queue(self._make(Kind.ERROR, exc.op, body, re=exc.message_id))

    def _check_fresh(self, message: Message) -> None:
        """Replay (id seen) and staleness (ts outside the window) checks.

        Errors are exempt from staleness: a ``stale`` error is exactly what a
        peer with a wrong clock must still be able to read.
        """
        now = self.now()
        if abs(now - message.ts) > self.window and message.kind is not Kind.ERROR:
            raise ProtocolError(ErrorCode.STALE,
                                f"timestamp {message.ts:.3f} is {now - message.ts:+.0f} s "
                                f"from this side's clock (window {self.window:.0f} s); "
                                "fix the clock (NTP) or apply server_time as offset")
        if message.id in self._seen:
            raise ProtocolError(ErrorCode.REPLAY,
                                f"message id {message.id} was already received on this "
                                "connection; every message needs a fresh id")
        # Remember the id until a replay of it would be refused as stale anyway.
        self._seen[message.id] = max(message.ts, now)
        self._prune_seen(now)

    def _prune_seen(self, now: float) -> None:
        """Forget ids that can no longer be replayed (bounded memory per connection)."""
        horizon = now - self.window
        while self._seen:
            oldest = next(iter(self._seen.values()))
            if oldest >= horizon and len(self._seen) <= MAX_SEEN_IDS:
                break
            self._seen.popitem(last=False)

    def _dispatch(self, message: Message) -> None:
        kind = message.kind
        if kind is Kind.ERROR:
            if message.re is not None and message.re not in self._outgoing \
                    and message.re in self._incoming \
                    and message.body.get("code") == ErrorCode.CANCELLED.value:
                state = self._incoming.pop(message.re)
                self._events.append(CancelReceived(message, state.request))
                return
            request = self._outgoing.pop(message.re, None) if message.re else None
            if message.re is not None and message.re == self._hello_sent and not self.established:
                self._hello_sent = None  # e.g. stale: fix clock_offset, say hello again
            self._events.append(ErrorReceived(message, request.request if request else None))
            return
        if not self.established:
            self._before_hello(message)
        if kind is Kind.REQUEST:
            self._on_request(message)
        elif kind is Kind.EVENT:
            served = HOME_EVENTS if self.role is Role.HOME else AGENT_EVENTS
            if message.op not in served:
                raise ProtocolError(ErrorCode.WRONG_DIRECTION,
                                    f"{message.op.value} events are not accepted here")
            self._events.append(EventReceived(message))
        elif kind is Kind.RESPONSE:
            state = self._answer_to(message)
            del self._outgoing[message.re]
            if message.op is Op.HELLO and self.role is Role.AGENT:
                self.established = True
            self._events.append(ResponseReceived(message, state.request))
        elif kind is Kind.CHUNK:
            state = self._answer_to(message)
            if message.seq != state.next_seq:
                raise ProtocolError(ErrorCode.BAD_SEQUENCE,
                                    f"chunk seq {message.seq}, expected {state.next_seq}")
            state.next_seq += 1
            self._events.append(ChunkReceived(message, state.request))
        else:
            self._on_ack(message)

    def _before_hello(self, message: Message) -> None:
        """Before the hello exchange only the hello request/response may pass."""
        if self.role is Role.HOME and message.kind is Kind.REQUEST and message.op is Op.HELLO \
                and self._hello_received is None:
            return
        if self.role is Role.AGENT and message.kind is Kind.RESPONSE \
                and message.re is not None and message.re == self._hello_sent:
            return
        raise ProtocolError(ErrorCode.NOT_HELLO,
                            "the first exchange on a connection must be hello "
                            f"(got {message.op.value} {message.kind.value})")

    def _on_request(self, message: Message) -> None:
        served = HOME_REQUESTS if self.role is Role.HOME else AGENT_REQUESTS
        if message.op not in served:
            raise ProtocolError(ErrorCode.WRONG_DIRECTION,
                                f"{message.op.value} requests are not served by the "
                                f"{self.role.value}")
        if message.op is Op.HELLO:
            if self.established or self._hello_received is not None:
                raise ProtocolError(ErrorCode.DUPLICATE_HELLO,
                                    "hello was already received on this connection")
            self._hello_received = message.id
        self._incoming[message.id] = _Incoming(message)
        self._events.append(RequestReceived(message))

    def _answer_to(self, message: Message) -> _Outgoing:
        state = self._outgoing.get(message.re)
        if state is None:
            raise ProtocolError(ErrorCode.UNKNOWN_REQUEST,
                                f"{message.kind.value} names request {message.re!r}, "
                                "which is not open (answered, timed out or never sent)")
        if state.request.op is not message.op:
            raise ProtocolError(ErrorCode.BAD_TYPE,
                                f"answer op {message.op.value} does not match request op "
                                f"{state.request.op.value}")
        return state

    def _on_ack(self, message: Message) -> None:
        state = self._incoming.get(message.re)
        if state is None:
            # The stream may already be finished (final response sent); late acks are fine.
            self._events.append(AckReceived(message))
            return
        if message.seq >= state.next_seq or message.seq < state.acked:
            raise ProtocolError(ErrorCode.BAD_SEQUENCE,
                                f"ack seq {message.seq} outside sent chunks "
                                f"{state.acked + 1}..{state.next_seq - 1}")
        state.acked = message.seq
        self._events.append(AckReceived(message))
