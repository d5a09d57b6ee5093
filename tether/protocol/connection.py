"""One WebSocket driven by a :class:`~tether.protocol.Session`: the asyncio half of the protocol.

Why one class for both ends: the agent's link and home's per-agent peer used to
drive the Session each with their own loop, and they disagreed (one forgot a
timed-out request instead of cancelling it, breaking rule 5; one dropped acks,
so a streaming handler polled the window; one flushed without a lock). Here the
rules are kept once: requests wait for their answer and are *cancelled* when the
requester gives up; a stream's chunks are acknowledged as the consumer takes
them; a streaming handler waits for window credit on :class:`AckReceived`; the
peer's requests are served each in a task and withdrawn on :class:`CancelReceived`;
all sends go out under one lock, in order; every task belongs to the connection
and ends with it.

What is left to each side is policy (hello, handlers, budgets, logging): it
subclasses :class:`Connection` and overrides :meth:`Connection.handle_request`,
:meth:`Connection.on_event` and :meth:`Connection.after_answer`.

The socket needs only ``async for text in ws``, ``await ws.send(text)`` and
``await ws.close(code, reason)`` (websockets' connections, or a test stand-in).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from websockets.exceptions import ConnectionClosed

from .codec import Message
from .schema import ErrorCode, Op
from .session import (AckReceived, CancelReceived, ChunkReceived, ErrorReceived,
                      RequestReceived, ResponseReceived, Session)

log = logging.getLogger("tether.protocol.connection")

#: Default wait for an answer to one of our requests (or the next piece of a stream).
REQUEST_TIMEOUT = 30.0
#: Default wait for the peer to acknowledge a chunk before a streaming handler gives up.
STREAM_ACK_TIMEOUT = 60.0


class HandlerError(Exception):
    """Refuse a request with a specific :class:`ErrorCode` (becomes an ``error`` reply).

    ``detail`` tells the peer (and the log) what was wrong and what to do;
    ``extra`` fields travel in the error body (e.g. ``limit`` for clones).
    """

    def __init__(self, code: ErrorCode | str, detail: str, **extra: Any) -> None:
        self.code = ErrorCode(code)
        super().__init__(f"{self.code.value}: {detail}")
        self.detail = detail
        self.extra = extra


class RequestFailed(HandlerError):
    """The peer answered one of our requests with an ``error``.

    A :class:`HandlerError` itself, so a handler that relays a request to the
    peer refuses its own request with the peer's code when it does not catch it.
    ``body`` is the whole error body (``server_time`` for ``stale``...).
    """

    @classmethod
    def from_error(cls, message: Message) -> RequestFailed:
        body = message.body
        return cls(_known_code(body.get("code")), str(body.get("detail", "")),
                   **{k: v for k, v in body.items() if k not in ("code", "detail")})

    @property
    def body(self) -> dict:
        return {"code": self.code.value, "detail": self.detail, **self.extra}


class Connection:
    """A live socket: our requests and streams, the peer's requests, and their tasks."""

    def __init__(self, ws, session: Session, name: str = "?") -> None:
        self.ws = ws
        self.session = session
        #: Who the peer is, for log lines and error texts.
        self.name = name
        #: Requests of the peer being served now, and since the socket opened.
        self.in_flight = 0
        self.served = 0
        self.last_request_at = 0.0
        self._send_lock = asyncio.Lock()
        self._waiters: dict[str, asyncio.Future] = {}
        self._streams: dict[str, asyncio.Queue] = {}
        self._serving: dict[str, asyncio.Task] = {}
        #: Set on every ack: streaming handlers wait on it for window credit.
        self._acked = asyncio.Event()
        #: The connection's task group: every task it starts, cancelled when it ends.
        self._tasks: set[asyncio.Task] = set()
        self._closing: tuple[int, str] | None = None
        self.closed = False

    # ------------------------------------------------------------ policy hooks

    async def handle_request(self, message: Message) -> dict:
        """Answer one request of the peer; raise :class:`HandlerError` to refuse it."""
        raise HandlerError(ErrorCode.UNKNOWN_OP, f"{message.op.value} is not served here")

    def on_event(self, event) -> None:
        """Events the connection does not consume: the peer's one-way events,
        protocol violations, and errors about no request we are waiting for."""

    async def after_answer(self, message: Message) -> None:
        """Called once the answer to the peer's ``message`` has been sent."""

    def internal_detail(self, message: Message, exc: Exception) -> str:
        """What the peer is told when a handler fails with a bug (the log has the rest)."""
        return f"error while serving {message.op.value}: {exc}"

    # ------------------------------------------------------------------ sending

    async def flush(self) -> None:
        """Send everything the session queued, in order (one sender at a time)."""
        async with self._send_lock:
            for text in self.session.data_to_send():
                await self.ws.send(text)

    async def event(self, op: Op, body: dict) -> None:
        self.session.event(op, body)
        await self.flush()

    async def request(self, op: Op, body: dict, timeout: float = REQUEST_TIMEOUT) -> Message:
        """Send a request and return its response.

        :class:`RequestFailed` when the peer answers with an error,
        :class:`ConnectionError` when the socket closes first, :class:`TimeoutError`
        when time runs out (the request is then cancelled at the peer).
        """
        return _result(await self.exchange(op, body, timeout))

    async def exchange(self, op: Op, body: dict,
                       timeout: float = REQUEST_TIMEOUT) -> ResponseReceived | ErrorReceived:
        """:meth:`request`, but the answer is returned as it came, error or not."""
        sent = self.session.request(op, body)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[sent.id] = waiter
        try:
            await self.flush()
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            self.withdraw(sent.id, f"gave up waiting after {timeout:.0f} s")
            raise
        finally:
            self._waiters.pop(sent.id, None)

    async def stream(self, op: Op, body: dict,
                     timeout: float = REQUEST_TIMEOUT) -> AsyncIterator[Message]:
        """Send a streaming request; yield each chunk, ack it once the consumer
        asks for the next one (i.e. has stored it), and finally yield the response.

        A pause of ``timeout`` between two pieces raises :class:`TimeoutError`,
        a closed socket :class:`ConnectionError`; either way, and when the
        consumer stops early, the request is cancelled at the peer.
        """
        sent = self.session.request(op, body)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[sent.id] = queue
        finished = False
        try:
            await self.flush()
            while True:
                event = await asyncio.wait_for(queue.get(), timeout)
                if event is None:
                    finished = True
                    raise ConnectionError(f"{op.value} stream from {self.name}: socket closed")
                if isinstance(event, ChunkReceived):
                    yield event.message
                    self.session.ack(event.message, {"cursor": event.message.body.get("cursor")})
                    await self.flush()
                    continue
                finished = True
                yield _result(event)
                return
        finally:
            self._streams.pop(sent.id, None)
            if not finished:  # consumer stopped early or the peer stalled: tell it
                self.withdraw(sent.id, "stopped reading the stream")

    async def send_chunk(self, request: Message, body: dict,
                         timeout: float = STREAM_ACK_TIMEOUT) -> None:
        """Send one chunk of the answer to ``request`` once the stream window has room.

        Waits for the peer's acks (:class:`AckReceived`), at most ``timeout``
        seconds without one (then :class:`HandlerError` ``timeout``); raises
        :class:`asyncio.CancelledError` when the peer withdrew the request.
        """
        deadline = time.monotonic() + timeout
        while self.session.is_open(request) and self.session.stream_credit(request) <= 0:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HandlerError(ErrorCode.TIMEOUT, f"the peer acknowledged no "
                                   f"{request.op.value} chunk for {timeout:.0f} s")
            self._acked.clear()
            try:
                await asyncio.wait_for(self._acked.wait(), left)
            except TimeoutError:
                pass
        if not self.session.is_open(request):
            raise asyncio.CancelledError  # the peer withdrew the request: send nothing more
        self.session.chunk(request, body)
        await self.flush()

    def withdraw(self, request_id: str, detail: str) -> None:
        """Cancel one of our requests at the peer (rule 5; sent in the background)."""
        if self.session.cancel(request_id, detail) is not None:
            try:
                self.spawn(self._flush_quietly())
            except RuntimeError:  # no running loop: the process is shutting down
                pass

    async def _flush_quietly(self) -> None:
        try:
            await self.flush()
        except ConnectionClosed:
            pass

    # ---------------------------------------------------------------- receiving

    async def run(self) -> None:
        """Read until the socket closes (or :meth:`drop`); never raises for what
        the peer sends. Then fail what still waits and cancel the task group."""
        try:
            async for data in self.ws:
                self.session.receive(data)
                for event in self.session.events_received():
                    self._dispatch(event)
                await self.flush()
                if self._closing is not None:
                    await self.ws.close(*self._closing)
                    break
        except ConnectionClosed:
            pass
        finally:
            self.closed = True
            for waiter in self._waiters.values():
                if not waiter.done():
                    waiter.set_exception(ConnectionError(f"socket to {self.name} closed"))
            for queue in self._streams.values():
                queue.put_nowait(None)
            self._acked.set()
            for task in list(self._tasks):
                task.cancel()

    def drop(self, code: int, reason: str) -> None:
        """Close the socket after the current frame is handled (policy's last word)."""
        if self._closing is None:
            self._closing = (code, reason)

    def spawn(self, coro) -> asyncio.Task:
        """Start a task that belongs to this connection (cancelled when it ends)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _dispatch(self, event) -> None:
        if isinstance(event, RequestReceived):
            self.serve(event.message)
        elif isinstance(event, CancelReceived):
            task = self._serving.get(event.request.id)
            if task is not None and not task.done():
                task.cancel()
            self.on_event(event)
        elif isinstance(event, ChunkReceived):
            queue = self._streams.get(event.request.id)
            if queue is not None:
                queue.put_nowait(event)
        elif isinstance(event, AckReceived):
            self._acked.set()
        elif isinstance(event, (ResponseReceived, ErrorReceived)) and event.request is not None \
                and self._take_answer(event):
            pass
        else:
            self.on_event(event)

    def _take_answer(self, event) -> bool:
        """Hand an answer to whoever waits for it; False when nobody does."""
        queue = self._streams.get(event.request.id)
        if queue is not None:
            queue.put_nowait(event)
            return True
        waiter = self._waiters.pop(event.request.id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(event)
            return True
        return False

    def serve(self, message: Message) -> None:
        """Serve a request of the peer in a task of the connection (the reader calls
        this; so may a caller that drove the session by hand before :meth:`run`)."""
        self.in_flight += 1
        self.last_request_at = time.monotonic()
        self._serving[message.id] = self.spawn(self._serve(message))

    async def _serve(self, message: Message) -> None:
        """Answer one request of the peer; a refusal or a bug becomes an error reply."""
        try:
            body = await self.handle_request(message)
            if self.session.is_open(message):
                self.session.respond(message, body)
        except HandlerError as exc:
            if self.session.is_open(message):
                self.session.fail(message, exc.code, exc.detail, **exc.extra)
        except asyncio.CancelledError:
            return
        except Exception as exc:  # noqa: BLE001 - a bug answers "internal", never kills us
            log.exception("handler for %s failed", message.op.value,
                          extra={"tether_fields": {"peer": self.name, "op": message.op.value}})
            if self.session.is_open(message):
                self.session.fail(message, ErrorCode.INTERNAL, self.internal_detail(message, exc))
        finally:
            self.in_flight -= 1
            self.served += 1
            self._serving.pop(message.id, None)
        try:
            await self.flush()
        except ConnectionClosed:
            log.warning("socket closed before the answer to %s could be sent", message.op.value,
                        extra={"tether_fields": {"peer": self.name}})
            return
        await self.after_answer(message)


def _result(event) -> Message:
    if isinstance(event, ErrorReceived):
        raise RequestFailed.from_error(event.message)
    return event.message


def _known_code(value) -> ErrorCode:
    try:
        return ErrorCode(value)
    except ValueError:
        return ErrorCode.INTERNAL
