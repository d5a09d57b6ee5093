"""What tether messages are: version, limits, kinds, operations, error codes and
the body fields each operation carries (the rules are in the package docstring)."""

from __future__ import annotations

import enum
import re
from typing import NamedTuple

PROTOCOL_VERSION = 1
SUBPROTOCOL = f"tether.v{PROTOCOL_VERSION}"
#: Largest tether message (one WebSocket message), bytes of UTF-8 JSON.
MAX_FRAME_BYTES = 1024 * 1024
#: Accepted distance between a message's ``ts`` and the receiver's clock.
DEFAULT_WINDOW_SECONDS = 300.0
#: Chunks a streaming side may have in flight before it waits for an ``ack``.
STREAM_WINDOW = 8
#: Message ids remembered per connection for replay detection (memory bound, about
#: 250 bytes each). When more than this many fresh ids arrive within the window, the
#: oldest is forgotten and its timestamp becomes a floor: nothing stamped at or
#: before it is accepted any more, so a forgotten id still cannot be replayed.
MAX_SEEN_IDS = 1024
#: Integers anywhere in a message are signed 64-bit (SQLite's INTEGER, C's int64).
MIN_INT, MAX_INT = -(2 ** 63), 2 ** 63 - 1
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
        (``fingerprint`` str required: DMI product UUID or EC2 instance id),
        ``proof`` object (optional: ``ts`` float, ``signature`` base64, made by
        :func:`tether.enrolproof.sign` with the instance's current key; required
        when the machine is enrolled already, see :mod:`tether.enrolproof`).
        response: ``instance_id`` str, ``cert_pem`` str, ``ca_pem`` str,
        ``not_after`` float (Unix time), ``renew_after`` float,
        ``config_key_pem`` str. After enrolling, the agent reconnects with the
        instance certificate.
        errors: ``clone_refused`` (the connector's max-instances is reached by
        other machines; or the machine is enrolled already and the request is
        not signed by its instance key: the error body then has
        ``instance_id``), ``bad_csr``, ``unauthorized``, ``busy`` (rate limit:
        home closes the socket; ``retry_after`` seconds in the body).
    ``renew`` (request A→H, instance connections)
        body: ``csr_pem`` str (same key or a new one). response: as ``enroll``.
        The certificate of the renewing socket stays valid, every older one of
        the instance is revoked. errors: ``busy`` (rate limit, socket closed).
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
        instance with :mod:`tether.sealing`); optional ``replace`` bool and
        ``reason`` str: home never signed the version the agent reports for this
        instance (a forged or restored state directory, or home's database was
        restored), so the agent takes this document although its version is
        lower (signature, target and secrets are checked as always). Home pushes
        after every hello unless the agent reports the version home *confirmed*
        (pushed, and answered ``applied``), and after a ``config.ack`` that
        reports another one.
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
    ``update`` (request H→A, issue 14)
        Home offers a whole-image update. body: ``version`` str (image version,
        :mod:`tether.imageversion`), ``sha256`` str (64 hex digits of the RAUC
        bundle), ``size`` int (bytes, at most :data:`MAX_BUNDLE_BYTES`),
        ``compatible`` str, optional ``deadline_seconds`` int (how long the
        trial boot of the new slot may take to become healthy), optional
        ``action`` "install" (default) | "abort" (drop a download not yet
        installed). The bundle itself travels over the same channel
        (``update.fetch``), so it goes the same way out as every socket (home's
        URLs, the CONNECT proxy); RAUC checks its signature against the
        image's keyring (home's update CA) before anything is written.
        response: ``accepted`` bool, ``state`` str (the agent's update state for
        that version), ``detail`` str.
    ``update.fetch`` (request A→H)
        body: ``version`` str, ``offset`` int, ``length`` int (at most
        :data:`UPDATE_CHUNK_BYTES`). Only a version home offered to this
        instance. response: ``data`` str (base64 of the bytes from ``offset``),
        ``size`` int (the bundle's size), ``eof`` bool. A download resumes from
        what the agent already has on disk.
    ``update.report`` (request A→H)
        body: ``version`` str, ``state`` str (offered|downloading|installed|
        rebooting|committed|rolled_back|failed, see :mod:`tether.home.rollout`),
        optional ``percent`` int, ``detail`` str, ``slot`` str, ``journal`` str
        (the failed slot's journal excerpt with a rollback).
        response: ``recorded`` bool.
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
    UPDATE_FETCH = "update.fetch"
    UPDATE_REPORT = "update.report"
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
                           Op.DIRECTORY_CHANGES, Op.UPDATE_FETCH, Op.UPDATE_REPORT})
HOME_EVENTS = frozenset({Op.HEARTBEAT, Op.CONFIG_ACK})
AGENT_REQUESTS = frozenset({
    Op.CONFIG_PUSH, Op.SYNC, Op.SEARCH, Op.AUTHENTICATE, Op.PROVISION,
    Op.UPDATE, Op.STATUS,
})
AGENT_EVENTS: frozenset[Op] = frozenset()
#: Largest update bundle home offers and an agent downloads (the root slot is smaller).
MAX_BUNDLE_BYTES = 4 * 1024 ** 3
#: Largest piece of a bundle one ``update.fetch`` returns: base64 of it fits a frame.
UPDATE_CHUNK_BYTES = 512 * 1024
#: A journal excerpt sent with a rollback report (characters).
JOURNAL_TEXT = 16 * 1024
#: Ops whose answers may be streamed as chunks.
STREAM_OPS = frozenset({Op.SYNC, Op.SEARCH})

_NUM = (int, float)

# ---- size limits of body fields (see :class:`Field`)
#: Versions, ids, codes, statuses, modes, roles.
SHORT = 64
#: Names: connectors, directories, servers, user names.
NAME = 256
#: Human text: error details, reasons.
TEXT = 1024
#: One PEM object (certificate, CSR, public key); a CA bundle gets :data:`PEM_BUNDLE`.
PEM = 16 * 1024
PEM_BUNDLE = 64 * 1024
#: Small nested objects home stores (machine facts, listening sockets).
SMALL_JSON = 4 * 1024
#: A self-check report (a few hundred bytes in practice; home stores the last one).
REPORT_JSON = 64 * 1024
#: Limit of a body field the table does not name (extra fields of a newer peer).
DEFAULT_LIMIT = TEXT
#: Extra (unnamed) fields one body may carry.
MAX_EXTRA_FIELDS = 32
#: ``limit`` of a field bounded by the frame size only (bulk data: changes, entries,
#: a configuration document, a free-form status report).
FRAME = None


class Field(NamedTuple):
    """One body field: accepted ``types`` (``None`` allows null), ``required``, and
    ``limit``: characters for a string, bytes of compact JSON for a list or object
    (:data:`FRAME`: bounded by the frame only). Numbers are bounded by
    :data:`MIN_INT`/:data:`MAX_INT` and finiteness for every field, named or not.

    Why per field and at decode: everything a peer sends may end up in a log line,
    a database row or memory held per socket; a 1 MB frame of one 1 MB "version"
    must be refused before any handler sees it, on both sides alike.
    """

    types: tuple
    required: bool
    limit: int | None = DEFAULT_LIMIT


F = Field
#: (op, kind) -> {field: Field}. One row per message: a new message type adds a row.
#: The key ``"*"`` gives the limit of fields the row does not name (default
#: :data:`DEFAULT_LIMIT`).
BODY_FIELDS: dict[tuple[Op, Kind], dict[str, Field]] = {
    (Op.HELLO, Kind.REQUEST): {
        "agent_version": F((str,), True, SHORT),
        "image_id": F((str,), True, SHORT),
        "instance_id": F((str, None), False, SHORT),
        "machine": F((dict,), False, SMALL_JSON),
        "selfcheck": F((dict,), False, REPORT_JSON),
        "listening": F((list,), False, REPORT_JSON),
        "socket_index": F((int,), False),
        "config_version": F((int, None), False),
        # issue 14: the image version the booted slot runs, and which slot (A|B)
        "image_version": F((str,), False, SHORT),
        "boot_slot": F((str, None), False, SHORT),
    },
    (Op.HELLO, Kind.RESPONSE): {
        "home_version": F((str,), True, SHORT),
        "server_time": F(_NUM, True),
        "role": F((str,), True, SHORT),
        "connector": F((str,), True, NAME),
        "instance_id": F((str, None), False, SHORT),
        "heartbeat_seconds": F((int,), False),
        "config_version": F((int, None), False),
        "config_key_pem": F((str,), False, PEM),
    },
    (Op.ENROLL, Kind.REQUEST): {
        "csr_pem": F((str,), True, PEM),
        "sealing_public_key": F((str,), True, NAME),
        "machine": F((dict,), True, SMALL_JSON),
        "proof": F((dict,), False, SMALL_JSON),
    },
    (Op.ENROLL, Kind.RESPONSE): {
        "instance_id": F((str,), True, SHORT),
        "cert_pem": F((str,), True, PEM),
        "ca_pem": F((str,), True, PEM_BUNDLE),
        "not_after": F(_NUM, True),
        "renew_after": F(_NUM, False),
        "config_key_pem": F((str,), False, PEM),
    },
    (Op.RENEW, Kind.REQUEST): {"csr_pem": F((str,), True, PEM)},
    (Op.RENEW, Kind.RESPONSE): {
        "instance_id": F((str,), True, SHORT),
        "cert_pem": F((str,), True, PEM),
        "ca_pem": F((str,), True, PEM_BUNDLE),
        "not_after": F(_NUM, True),
        "renew_after": F(_NUM, False),
    },
    (Op.HEARTBEAT, Kind.EVENT): {
        "uptime": F(_NUM, False),
        "selfcheck": F((dict,), False, REPORT_JSON),
        "listening": F((list,), False, REPORT_JSON),
        "config_version": F((int, None), False),
        "draining": F((bool,), False),
        "directories": F((dict,), False, REPORT_JSON),
    },
    (Op.CONFIG_PUSH, Kind.REQUEST): {
        "config": F((dict,), True, FRAME),
        "replace": F((bool,), False),
        "reason": F((str,), False, TEXT),
    },
    (Op.CONFIG_PUSH, Kind.RESPONSE): {
        "version": F((int,), True),
        "applied": F((bool,), True),
    },
    (Op.CONFIG_ACK, Kind.EVENT): {
        "version": F((int, None), True),
        "status": F((str,), True, SHORT),
        "error": F((str,), False, SHORT),
        "detail": F((str,), False, TEXT),
    },
    (Op.SYNC, Kind.REQUEST): {
        "directory": F((str,), True, NAME),
        "mode": F((str,), True, SHORT),
        "cursor": F((str, None), False, PEM),
    },
    (Op.SYNC, Kind.CHUNK): {
        "changes": F((list,), True, FRAME),
        "cursor": F((str,), True, PEM),
    },
    (Op.SYNC, Kind.RESPONSE): {
        "cursor": F((str, None), True, PEM),
        "chunks": F((int,), False),
        "changes": F((int,), False),
        "following": F((bool,), False),
        "pending": F((int,), False),
    },
    (Op.DIRECTORY_CHANGES, Kind.REQUEST): {
        "directory": F((str,), True, NAME),
        "entries": F((list,), True, FRAME),
        "after": F((int, None), False),
    },
    (Op.DIRECTORY_CHANGES, Kind.RESPONSE): {
        "applied_through": F((int,), True),
        "leader": F((bool,), True),
    },
    (Op.SEARCH, Kind.REQUEST): {
        "directory": F((str,), True, NAME),
        "filter": F((str,), True, PEM),
        "kind": F((str,), False, SHORT),
        "limit": F((int,), False),
        "base": F((str, None), False, PEM),
        "scope": F((str,), False, SHORT),
        "attributes": F((list,), False, PEM),
    },
    (Op.SEARCH, Kind.CHUNK): {"entries": F((list,), True, FRAME)},
    (Op.SEARCH, Kind.RESPONSE): {"*": F((), False, FRAME)},
    (Op.AUTHENTICATE, Kind.REQUEST): {
        "directory": F((str,), True, NAME),
        "username": F((str,), True, PEM),
        "password": F((str,), True, PEM),
        # false: the password check only, no group look-up (an agent before this field
        # ignores it and answers with groups)
        "groups": F((bool,), False),
    },
    (Op.AUTHENTICATE, Kind.RESPONSE): {
        "ok": F((bool,), True),
        "outcome": F((str,), False, SHORT),
        "dn": F((str, None), False, PEM),
        "groups": F((list,), False, FRAME),
        "server": F((str, None), False, PEM),
        "*": F((), False, FRAME),
    },
    (Op.PROVISION, Kind.REQUEST): {
        "directory": F((str,), True, NAME),
        "order": F((dict,), True, FRAME),
    },
    (Op.PROVISION, Kind.RESPONSE): {
        "ok": F((bool,), True),
        "result": F((dict,), False, FRAME),
        "*": F((), False, FRAME),
    },
    (Op.UPDATE, Kind.REQUEST): {
        "version": F((str,), True, SHORT),
        "sha256": F((str,), True, SHORT),
        "size": F((int,), True),
        "compatible": F((str,), True, SHORT),
        "deadline_seconds": F((int,), False),
        "action": F((str,), False, SHORT),
    },
    (Op.UPDATE, Kind.RESPONSE): {
        "accepted": F((bool,), True),
        "state": F((str, None), False, SHORT),
        "detail": F((str,), False, TEXT),
    },
    (Op.UPDATE_FETCH, Kind.REQUEST): {
        "version": F((str,), True, SHORT),
        "offset": F((int,), True),
        "length": F((int,), True),
    },
    (Op.UPDATE_FETCH, Kind.RESPONSE): {
        "data": F((str,), True, FRAME),
        "size": F((int,), True),
        "eof": F((bool,), True),
    },
    (Op.UPDATE_REPORT, Kind.REQUEST): {
        "version": F((str,), True, SHORT),
        "state": F((str,), True, SHORT),
        "percent": F((int,), False),
        "detail": F((str,), False, TEXT),
        "slot": F((str, None), False, SHORT),
        "journal": F((str,), False, JOURNAL_TEXT),
    },
    (Op.UPDATE_REPORT, Kind.RESPONSE): {"recorded": F((bool,), True)},
    (Op.STATUS, Kind.RESPONSE): {"*": F((), False, FRAME)},
}
_ERROR_FIELDS = {"code": F((str,), True, SHORT), "detail": F((str,), True, TEXT)}
_ACK_FIELDS = {"cursor": F((str, None), False, TEXT)}


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


