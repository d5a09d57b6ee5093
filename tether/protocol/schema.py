"""What tether messages are: version, limits, kinds, operations, error codes and
the body fields each operation carries (the rules are in the package docstring)."""

from __future__ import annotations

import enum
import re

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
        is being rotated out; home sends it no new requests), optional
        ``directories`` object: directory id -> ``{"pending": int, "waiting_s":
        number, "following": bool, "error": {code, message, hint}|null}`` for the
        directories it leads or still holds changes of (at most 32; home shows
        a stall in ``directory status`` from it).
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
        agent/directory/README.md, or one ``part`` of a message larger than a
        frame, see :mod:`tether.protocol.parts`), at most :data:`MAX_FRAME_BYTES` in all,
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

    # Envelope / session level (raised by the codec and the session).
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
        "directories": ((dict,), False),
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


