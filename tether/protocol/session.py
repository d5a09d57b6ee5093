"""The sans-I/O conversation state machine both ends drive (:class:`Session`):
text in, events out, text to send; hello first, replay and clock checks, streams
with acknowledgements, cancellation."""

from __future__ import annotations

import enum
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .codec import Message, decode, encode, new_id
from .schema import (_ERROR_FIELDS, AGENT_EVENTS, AGENT_REQUESTS, DEFAULT_WINDOW_SECONDS,
                     HOME_EVENTS, HOME_REQUESTS, MAX_SEEN_IDS, STREAM_OPS, STREAM_WINDOW,
                     ErrorCode, Kind, Op, ProtocolError)

#: Longest ``detail`` an error message may carry (longer ones are cut before sending).
_MAX_DETAIL = _ERROR_FIELDS["detail"].limit


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


class SeenIds:
    """Message ids received on one connection: a window with a time horizon.

    An id must be refused as ``replay`` for as long as its message would still
    pass the staleness check (``window`` seconds around its ``ts``); after that
    the clock check refuses a replay anyway and the id is forgotten. A peer
    sending fresh ids faster than ``capacity`` per window does not grow this:
    the oldest id is forgotten early, and its timestamp becomes a *floor*:
    messages stamped at or before it are refused (:meth:`check`), so a
    forgotten id still cannot come back. A peer's messages carry increasing
    timestamps, so a well-behaved peer never meets the floor.
    """

    def __init__(self, window: float, capacity: int = MAX_SEEN_IDS) -> None:
        self.window = window
        self.capacity = capacity
        self.floor = -math.inf
        self._ids: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, message_id: str) -> bool:
        return message_id in self._ids

    def check(self, message: Message, now: float) -> None:
        """Raise ``replay`` for an id seen before (or possibly forgotten); else remember it."""
        if message.id in self._ids or message.ts <= self.floor:
            why = "was already received" if message.id in self._ids else \
                "may have been received (it is older than the ids still remembered)"
            raise ProtocolError(ErrorCode.REPLAY,
                                f"message id {message.id} {why} on this connection; every "
                                "message needs a fresh id and a current timestamp")
        # Remember the id until a replay of it would be refused as stale anyway.
        self._ids[message.id] = (max(message.ts, now), message.ts)
        horizon = now - self.window
        while self._ids:
            expires, ts = next(iter(self._ids.values()))
            if expires >= horizon and len(self._ids) <= self.capacity:
                break
            self._ids.popitem(last=False)
            if expires >= horizon:  # forgotten early: keep refusing its timestamp
                self.floor = max(self.floor, ts)


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
    _seen: SeenIds | None = field(default=None, repr=False)
    _outgoing: dict = field(default_factory=dict, repr=False)
    _incoming: dict = field(default_factory=dict, repr=False)
    _hello_sent: str | None = field(default=None, repr=False)
    _hello_received: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self._seen is None:
            self._seen = SeenIds(self.window)

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
        body = {"code": code.value, "detail": _cut(detail), **extra}
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
        body = {"code": ErrorCode.CANCELLED.value, "detail": _cut(detail)}
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
        body = {"code": exc.code.value, "detail": _cut(exc.detail), **exc.extra}
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
        self._seen.check(message, now)

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


def _cut(detail: str) -> str:
    """An error detail within the protocol's limit (details are human text: cut, not refused)."""
    detail = str(detail)
    return detail if len(detail) <= _MAX_DETAIL else detail[:_MAX_DETAIL - 3] + "..."
