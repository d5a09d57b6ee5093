"""The tether wire protocol (agent ⇄ home), version 1: one package both sides import.

The rules are here; ``schema`` names what messages are (kinds, operations, error
codes, body fields, limits), ``codec`` turns one message to and from JSON,
``session`` is the conversation, ``connection`` drives it over a socket and
``changes`` types the directory change stream (``p.changes``). Everything else is
re-exported from this package, so both sides write ``from tether import protocol
as p`` and never name another submodule.

Shaped like python-websockets' ``protocol.py``: a *sans-I/O* state machine. Text
goes in (:meth:`Session.receive`), events come out (:meth:`Session.events_received`)
and text to send piles up (:meth:`Session.data_to_send`); no sockets, no asyncio
there. The I/O layer is one class both sides subclass, :class:`Connection` (``connection``):
a thin asyncio loop around a :class:`Session`, so the rules below are tested
without any network and kept by one piece of code.

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

Limits
======

Everything a peer sends may reach a log line, a database row or memory held per
socket, so :func:`decode` bounds it before any handler sees it, on both sides:
integers are signed 64-bit, numbers finite, strings valid Unicode (no lone
surrogate), each body field within its :class:`Field` ``limit`` in
:data:`BODY_FIELDS` (fields a row does not name: :data:`DEFAULT_LIMIT` each, at
most :data:`MAX_EXTRA_FIELDS`), and the replay memory of a connection is
:data:`MAX_SEEN_IDS` ids (:class:`SeenIds`). Anything else is a
:class:`ProtocolError`, never another exception (the hypothesis tests in
``tests/unit/test_protocol_fuzz.py`` hold the package to that).

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

from . import changes
from .codec import Message, RawJSON, decode, encode, new_id, validate
from .connection import Connection, HandlerError, RequestFailed
from .parts import MAX_MESSAGE_BYTES, MAX_PART_BYTES, MAX_PARTS, PART_TYPE, Part
from .parts import join as join_parts, split as split_parts
from .records import MAX_DELTA_VALUES, MEMBER_DELTA_OP, check_member_delta, member_delta
from .schema import (AGENT_EVENTS, AGENT_REQUESTS, BODY_FIELDS, DEFAULT_LIMIT,
                     DEFAULT_WINDOW_SECONDS, FRAME, HEARTBEAT_SECONDS, HOME_EVENTS, HOME_REQUESTS,
                     MAX_EXTRA_FIELDS, MAX_FRAME_BYTES, MAX_INT, MAX_SEEN_IDS, MIN_INT, NAME, PEM,
                     PEM_BUNDLE, PROTOCOL_VERSION, REPORT_JSON, SHORT, SMALL_JSON, STREAM_OPS,
                     STREAM_WINDOW, SUBPROTOCOL, TEXT, ErrorCode, Field, Kind, Op, ProtocolError,
                     JOURNAL_TEXT, MAX_BUNDLE_BYTES, UPDATE_CHUNK_BYTES)
from .session import (AckReceived, CancelReceived, ChunkReceived, ErrorReceived, Event,
                      EventReceived, ProtocolViolation, RequestReceived, ResponseReceived, Role,
                      SeenIds, Session)

__all__ = [
    "AGENT_EVENTS", "AGENT_REQUESTS", "BODY_FIELDS", "DEFAULT_LIMIT", "DEFAULT_WINDOW_SECONDS",
    "FRAME", "HEARTBEAT_SECONDS", "HOME_EVENTS", "HOME_REQUESTS", "MAX_EXTRA_FIELDS",
    "MAX_FRAME_BYTES", "MAX_INT", "MAX_SEEN_IDS", "MIN_INT", "NAME", "PEM", "PEM_BUNDLE",
    "PROTOCOL_VERSION", "REPORT_JSON", "SHORT", "SMALL_JSON", "STREAM_OPS", "STREAM_WINDOW",
    "SUBPROTOCOL", "TEXT", "JOURNAL_TEXT", "MAX_BUNDLE_BYTES", "UPDATE_CHUNK_BYTES",
    "ErrorCode", "Field", "Kind", "Op", "ProtocolError",
    "Message", "RawJSON", "decode", "encode", "new_id", "validate",
    "MAX_MESSAGE_BYTES", "MAX_PART_BYTES", "MAX_PARTS", "PART_TYPE", "Part", "join_parts",
    "split_parts",
    "MAX_DELTA_VALUES", "MEMBER_DELTA_OP", "check_member_delta", "member_delta",
    "AckReceived", "CancelReceived", "ChunkReceived", "ErrorReceived", "Event", "EventReceived",
    "ProtocolViolation", "RequestReceived", "ResponseReceived", "Role", "SeenIds", "Session",
    "Connection", "HandlerError", "RequestFailed", "changes",
]
