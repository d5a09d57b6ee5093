"""One agent WebSocket on home's side: a thin asyncio loop around a protocol Session.

The :class:`~tether.protocol.Session` decides what is valid; this class only
moves text between it and the socket, runs request handlers, and turns
responses into awaited results (:meth:`AgentPeer.request`) or streams
(:meth:`AgentPeer.stream`).

Everything a peer can make home do per frame is bounded by :class:`PeerLimits`
(issue 11): protocol violations and unsolicited ``error`` frames spend a
per-socket budget (:data:`MAX_VIOLATIONS` at once, then one per
:data:`VIOLATION_REFILL_SECONDS`; a single bad frame only gets an error reply,
an exhausted budget closes the socket with 1008); events (heartbeat,
``config.ack``, each a database write) spend a per-instance budget, and
events over it are dropped and count as violations; the log lines a peer
causes spend a per-credential budget (:class:`~tether.home.logs.PeerLog`).
An image-credential socket exists to enrol: it is closed after
:data:`ENROLL_SECONDS` whatever it did.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING
from collections.abc import AsyncIterator

from websockets.exceptions import ConnectionClosed

from tether import protocol as p
from tether.home.errors import AgentUnavailable, HomeError
from tether.home.gate import Identity
from tether.home.logs import PeerLog, event
from tether.home.ratelimit import RateLimit

if TYPE_CHECKING:
    from tether.home.hub import Hub

log = logging.getLogger("tether.home.peer")
#: Violations (and unsolicited error frames) a socket may send at once...
MAX_VIOLATIONS = 50
#: ...and then one per this many seconds; beyond that the socket is closed (1008).
VIOLATION_REFILL_SECONDS = 10.0
#: Events (heartbeats, config acks) one instance may send at once, and per second after.
#: An agent sends one heartbeat per socket every 30 s and a config.ack per change.
EVENT_BURST, EVENT_RATE = 30, 1.0
#: Log lines one credential may cause at once, and per second after.
LOG_BURST, LOG_RATE = 30, 1.0
REQUEST_TIMEOUT = 30.0
#: A socket that has not completed hello by then is closed (it holds resources for nothing).
HELLO_TIMEOUT = 30.0
#: An image-credential socket is closed this long after it opened: enough to say
#: hello and enrol; a real agent closes it itself and reconnects as the instance.
ENROLL_SECONDS = 30.0


class PeerLimits:
    """The budgets every socket spends (shared by all sockets of one home).

    Keys: the socket for violations (a new socket starts with a full budget, but
    costs a TLS handshake), the credential for events and log lines (so more
    sockets do not buy more writes or more log).
    """

    def __init__(self) -> None:
        self.violations = RateLimit(1 / VIOLATION_REFILL_SECONDS, MAX_VIOLATIONS,
                                    max_keys=100_000)
        self.events = RateLimit(EVENT_RATE, EVENT_BURST, max_keys=100_000)
        self.log = PeerLog(LOG_RATE, LOG_BURST, max_keys=100_000)
        #: What the limits did since start (``status`` of the running server).
        self.counts: dict[str, int] = {}

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1


def credential_key(identity: Identity) -> str:
    """Who pays for a socket's events and log lines: its instance, or its image."""
    if identity.role == "instance" and identity.instance_id:
        return f"instance:{identity.instance_id}"
    return f"image:{identity.image_id}"


class AgentPeer(p.Connection):
    """One connected agent socket: a protocol Connection with home's bookkeeping and budgets."""

    def __init__(self, ws, identity: Identity, hub: Hub, socket_id: str,
                 limits: PeerLimits | None = None) -> None:
        super().__init__(ws, p.Session(p.Role.HOME), name=_peer_name(ws))
        self.identity = identity
        self.hub = hub
        self.socket_id = socket_id
        self.peer = self.name
        self.limits = limits or PeerLimits()
        self.key = credential_key(identity)
        self.hello: dict | None = None
        #: An image socket that enrolled successfully (logged when it is closed).
        self.enrolled = False
        #: The agent announced (heartbeat ``draining``) that it rotates this socket out.
        self.draining = False
        self.connected_at = time.time()

    # ------------------------------------------------------------------ loop

    async def run(self, hello_timeout: float = HELLO_TIMEOUT,
                  enroll_timeout: float = ENROLL_SECONDS) -> None:
        """Read until the socket closes; never raises for anything the peer sends."""
        self.spawn(self._hello_watchdog(hello_timeout))
        if self.identity.role == "image":
            self.spawn(self._enroll_deadline(enroll_timeout))
        try:
            await super().run()
        finally:
            self.limits.violations.forget(self.socket_id)
            self.limits.log.flush(self.key, log, peer=self.peer, **self._who())

    def _spend_violation(self, why: str) -> None:
        """One violation or unsolicited error: over budget, the socket is closed."""
        if self.limits.violations.allow(self.socket_id) or self._closing is not None:
            return
        reason = f"{why}: more than {MAX_VIOLATIONS} at once or one per " \
                 f"{VIOLATION_REFILL_SECONDS:.0f} s"
        self.limits.count("closed_over_violation_budget")
        event(log, logging.WARNING, "peer_dropped", peer=self.peer, reason=reason,
              violations=self.session.violations, **self._who())
        self.drop(1008, "too many protocol violations")

    async def _hello_watchdog(self, timeout: float) -> None:
        await asyncio.sleep(timeout)
        if not self.session.established:
            self.limits.count("closed_without_hello")
            event(log, logging.WARNING, "peer_dropped", peer=self.peer,
                  reason=f"no hello within {timeout:.0f} s", **self._who())
            await self.ws.close(1008, "hello expected")

    async def _enroll_deadline(self, timeout: float) -> None:
        """Image sockets are for enrolling, and short-lived: close them at the deadline."""
        await asyncio.sleep(timeout)
        if self.ws.close_code is not None:
            return
        self.limits.count("image_sockets_closed_at_deadline")
        reason = f"image socket open {timeout:.0f} s" + \
            ("" if self.enrolled else " without enrolling")
        event(log, logging.WARNING, "peer_dropped", peer=self.peer, reason=reason,
              enrolled=self.enrolled, **self._who())
        await self.ws.close(1008, "enrol within the time limit, then reconnect as the instance")

    def _who(self) -> dict:
        return {"role": self.identity.role, "connector": self.identity.connector,
                "instance": self.identity.instance_id, "image": self.identity.image_id}

    def _log(self, level: int, name: str, **fields) -> None:
        """A line this peer caused: within its credential's log budget."""
        self.limits.log.event(self.key, log, level, name, peer=self.peer, **fields,
                              **self._who())

    def on_event(self, ev) -> None:
        if isinstance(ev, p.ProtocolViolation):
            self._spend_violation("protocol violations")
            self._log(logging.WARNING, "protocol_violation", code=ev.error.code.value,
                      detail=ev.error.detail, message_id=ev.error.message_id)
        elif isinstance(ev, p.EventReceived):
            if not self.limits.events.allow(self.key):
                self.limits.count("events_dropped")
                self._spend_violation("events over budget")
                self._log(logging.WARNING, "event_dropped", op=ev.message.op.value,
                          reason=f"more than {EVENT_BURST} events at once or "
                                 f"{EVENT_RATE:g} per second from this credential")
                return
            self._guard(lambda: self.hub.on_event(self, ev.message))
        elif isinstance(ev, p.ErrorReceived) and ev.request is None:
            self._spend_violation("unsolicited error frames")
            self._log(logging.WARNING, "agent_error", code=ev.message.body.get("code"),
                      detail=ev.message.body.get("detail"))

    def _guard(self, func) -> None:
        """Run a handler; a bug in it is logged, never fatal for the connection."""
        try:
            func()
        except Exception:
            log.exception("event handler failed", extra={"tether_fields": {"peer": self.peer}})

    async def handle_request(self, message: p.Message) -> dict:
        """Answer one agent request through the hub; a refusal is logged (budgeted)."""
        try:
            body = await self.hub.handle_request(self, message)
        except HomeError as exc:
            self._log(logging.WARNING, "request_refused", op=message.op.value,
                      code=exc.code.value, detail=exc.detail)
            raise
        if message.op is p.Op.ENROLL:
            self.enrolled = True
        return body

    def internal_detail(self, message: p.Message, exc: Exception) -> str:
        return "home failed to handle the request; see home's log"

    async def after_answer(self, message: p.Message) -> None:
        if message.op is p.Op.HELLO and self.session.established:
            await self.hub.after_hello(self)

    # ------------------------------------------------------- home → agent API

    async def request(self, op: p.Op, body: dict, timeout: float = REQUEST_TIMEOUT) -> p.Message:
        """Send a request to this agent and return its response message.

        Raises :class:`~tether.protocol.RequestFailed` when the agent answers with an error,
        :class:`AgentUnavailable` when the socket closes or time runs out.
        """
        try:
            return await super().request(op, body, timeout)
        except (TimeoutError, ConnectionError, ConnectionClosed) as exc:
            why = "timed out" if isinstance(exc, TimeoutError) else "socket closed"
            raise AgentUnavailable(f"{op.value} to {self.peer} got no answer: {why}") from None

    async def stream(self, op: p.Op, body: dict,
                     timeout: float = REQUEST_TIMEOUT) -> AsyncIterator[p.Message]:
        """Send a streaming request; yield each chunk, ack it once the consumer
        asks for the next one (i.e. has stored it), and finally yield the response."""
        pieces = super().stream(op, body, timeout)
        try:
            async for message in pieces:
                yield message
        except TimeoutError:
            raise AgentUnavailable(f"{op.value} stream from {self.peer} stalled "
                                   f"for {timeout:.0f} s") from None
        except (ConnectionError, ConnectionClosed):
            raise AgentUnavailable(f"{op.value} stream from {self.peer}: socket closed") from None
        finally:
            await pieces.aclose()


def _peer_name(ws) -> str:
    address = getattr(ws, "remote_address", None)
    if not address:
        return "?"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
