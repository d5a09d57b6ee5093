"""One agent WebSocket on home's side: a thin asyncio loop around a protocol Session.

The :class:`~tether.protocol.Session` decides what is valid; this class only
moves text between it and the socket, runs request handlers, and turns
responses into awaited results (:meth:`AgentPeer.request`) or streams
(:meth:`AgentPeer.stream`). A peer that keeps sending garbage is disconnected
with close code 1008 after :data:`MAX_VIOLATIONS`; a single bad frame only gets
an error reply.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING
from collections.abc import AsyncIterator

from websockets.exceptions import ConnectionClosed

from tether import protocol as p
from tether.home.errors import AgentUnavailable, HomeError, RequestFailed
from tether.home.gate import Identity
from tether.home.logs import event

if TYPE_CHECKING:
    from tether.home.hub import Hub

log = logging.getLogger("tether.home.peer")
MAX_VIOLATIONS = 50
REQUEST_TIMEOUT = 30.0
#: A socket that has not completed hello by then is closed (it holds resources for nothing).
HELLO_TIMEOUT = 30.0


class AgentPeer:
    """State and I/O of one connected agent socket."""

    def __init__(self, ws, identity: Identity, hub: Hub, socket_id: str) -> None:
        self.ws = ws
        self.identity = identity
        self.hub = hub
        self.socket_id = socket_id
        self.peer = _peer_name(ws)
        self.session = p.Session(p.Role.HOME)
        self.hello: dict | None = None
        #: The agent announced (heartbeat ``draining``) that it rotates this socket out.
        self.draining = False
        self.connected_at = time.time()
        self._send_lock = asyncio.Lock()
        self._waiters: dict[str, asyncio.Future] = {}
        self._streams: dict[str, asyncio.Queue] = {}
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ loop

    async def run(self, hello_timeout: float = HELLO_TIMEOUT) -> None:
        """Read until the socket closes; never raises for anything the peer sends."""
        self._spawn(self._hello_watchdog(hello_timeout))
        try:
            async for data in self.ws:
                self.session.receive(data)
                for ev in self.session.events_received():
                    self._on_event(ev)
                await self.flush()
                if self.session.violations > MAX_VIOLATIONS:
                    event(log, logging.WARNING, "peer_dropped", peer=self.peer,
                          reason="too many protocol violations", **self._who())
                    await self.ws.close(1008, "too many protocol violations")
                    break
        except ConnectionClosed:
            pass
        finally:
            self._fail_waiters()
            for task in list(self._tasks):
                task.cancel()

    async def _hello_watchdog(self, timeout: float) -> None:
        await asyncio.sleep(timeout)
        if not self.session.established:
            event(log, logging.WARNING, "peer_dropped", peer=self.peer,
                  reason=f"no hello within {timeout:.0f} s", **self._who())
            await self.ws.close(1008, "hello expected")

    async def flush(self) -> None:
        """Send everything the session queued, in order (one sender at a time)."""
        async with self._send_lock:
            for text in self.session.data_to_send():
                await self.ws.send(text)

    def _who(self) -> dict:
        return {"role": self.identity.role, "connector": self.identity.connector,
                "instance": self.identity.instance_id, "image": self.identity.image_id}

    def _on_event(self, ev) -> None:
        if isinstance(ev, p.ProtocolViolation):
            event(log, logging.WARNING, "protocol_violation", peer=self.peer,
                  code=ev.error.code.value, detail=ev.error.detail,
                  message_id=ev.error.message_id, **self._who())
        elif isinstance(ev, p.RequestReceived):
            self._spawn(self._serve(ev.message))
        elif isinstance(ev, p.EventReceived):
            self._guard(lambda: self.hub.on_event(self, ev.message))
        elif isinstance(ev, (p.ResponseReceived, p.ErrorReceived)):
            self._resolve(ev)
        elif isinstance(ev, p.ChunkReceived):
            queue = self._streams.get(ev.request.id)
            if queue is not None:
                queue.put_nowait(ev)
        # AckReceived: home does not stream to agents (yet); nothing to release.

    def _resolve(self, ev) -> None:
        request = ev.request
        if request is None:
            event(log, logging.WARNING, "agent_error", peer=self.peer,
                  code=ev.message.body.get("code"), detail=ev.message.body.get("detail"),
                  **self._who())
            return
        waiter = self._waiters.pop(request.id, None)
        queue = self._streams.get(request.id)
        if queue is not None:
            queue.put_nowait(ev)
        elif waiter is not None and not waiter.done():
            waiter.set_result(ev)

    def _guard(self, func) -> None:
        """Run a handler; a bug in it is logged, never fatal for the connection."""
        try:
            func()
        except Exception:
            log.exception("event handler failed", extra={"tether_fields": {"peer": self.peer}})

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, message: p.Message) -> None:
        """Answer one agent request through the hub; errors become error replies."""
        try:
            body = await self.hub.handle_request(self, message)
            self.session.respond(message, body)
        except HomeError as exc:
            event(log, logging.WARNING, "request_refused", peer=self.peer,
                  op=message.op.value, code=exc.code.value, detail=exc.detail, **self._who())
            self.session.fail(message, exc.code, exc.detail, **exc.extra)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("request handler failed",
                          extra={"tether_fields": {"peer": self.peer, "op": message.op.value}})
            self.session.fail(message, p.ErrorCode.INTERNAL,
                              "home failed to handle the request; see home's log")
        try:
            await self.flush()
        except ConnectionClosed:
            return
        if message.op is p.Op.HELLO and self.session.established:
            await self.hub.after_hello(self)

    # ------------------------------------------------------- home → agent API

    async def request(self, op: p.Op, body: dict, timeout: float = REQUEST_TIMEOUT) -> p.Message:
        """Send a request to this agent and return its response message.

        Raises :class:`RequestFailed` when the agent answers with an error,
        :class:`AgentUnavailable` when the socket closes or time runs out.
        """
        sent = self.session.request(op, body)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[sent.id] = waiter
        try:
            await self.flush()
            ev = await asyncio.wait_for(waiter, timeout)
        except (TimeoutError, ConnectionClosed) as exc:
            self._withdraw(sent.id, f"home stopped waiting after {timeout:.0f} s")
            self._waiters.pop(sent.id, None)
            why = "timed out" if isinstance(exc, TimeoutError) else "socket closed"
            raise AgentUnavailable(f"{op.value} to {self.peer} got no answer: {why}") from None
        return _result(ev)

    async def stream(self, op: p.Op, body: dict,
                     timeout: float = REQUEST_TIMEOUT) -> AsyncIterator[p.Message]:
        """Send a streaming request; yield each chunk, ack it once the consumer
        asks for the next one (i.e. has stored it), and finally yield the response."""
        sent = self.session.request(op, body)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[sent.id] = queue
        finished = False
        try:
            await self.flush()
            while True:
                try:
                    ev = await asyncio.wait_for(queue.get(), timeout)
                except TimeoutError:
                    raise AgentUnavailable(f"{op.value} stream from {self.peer} stalled "
                                           f"for {timeout:.0f} s") from None
                if ev is None:
                    finished = True
                    raise AgentUnavailable(f"{op.value} stream from {self.peer}: socket closed")
                if isinstance(ev, p.ChunkReceived):
                    yield ev.message
                    self.session.ack(ev.message, {"cursor": ev.message.body.get("cursor")})
                    await self.flush()
                    continue
                finished = True
                yield _result(ev)
                return
        finally:
            self._streams.pop(sent.id, None)
            if not finished:  # consumer stopped early or the agent stalled: tell it
                self._withdraw(sent.id, "home stopped reading the stream")

    def _withdraw(self, request_id: str, detail: str) -> None:
        """Cancel one of our requests at the agent (sent in the background)."""
        if self.session.cancel(request_id, detail) is not None:
            try:
                self._spawn(self._flush_quietly())
            except RuntimeError:  # no running loop: the process is shutting down
                pass

    async def _flush_quietly(self) -> None:
        try:
            await self.flush()
        except ConnectionClosed:
            pass

    def _fail_waiters(self) -> None:
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(ConnectionClosed(None, None))
        self._waiters.clear()
        for queue in self._streams.values():
            queue.put_nowait(None)


def _result(ev) -> p.Message:
    if isinstance(ev, p.ErrorReceived):
        body = ev.message.body
        raise RequestFailed(_code(body.get("code")), str(body.get("detail", "")),
                            **{k: v for k, v in body.items() if k not in ("code", "detail")})
    return ev.message


def _code(value) -> p.ErrorCode:
    try:
        return p.ErrorCode(value)
    except ValueError:
        return p.ErrorCode.INTERNAL


def _peer_name(ws) -> str:
    address = getattr(ws, "remote_address", None)
    if not address:
        return "?"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
