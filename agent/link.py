"""One WebSocket to home driven by a :class:`tether.protocol.Session` (thin asyncio).

The link feeds received texts to the sans-I/O session, sends what it queues,
resolves futures for our requests (hello, enroll, renew, status) and starts a
task per request home sends (config.push, status, directory operations) through
a handler. It counts requests in flight so rotation knows when a draining
socket may close.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from tether import protocol as p

log = logging.getLogger("tether.agent.link")

#: handler(link, request message) -> response body; raise HandlerError to fail it.
Handler = Callable[["Link", p.Message], Awaitable[dict]]


class HandlerError(Exception):
    """A request handler refuses: becomes a protocol ``error`` with ``code``."""

    def __init__(self, code: p.ErrorCode | str, detail: str) -> None:
        super().__init__(detail)
        self.code = p.ErrorCode(code)
        self.detail = detail


class RequestFailed(Exception):
    """Home answered one of our requests with an error."""

    def __init__(self, message: p.Message) -> None:
        self.code = str(message.body.get("code"))
        self.detail = str(message.body.get("detail", ""))
        self.body = message.body
        super().__init__(f"{self.code}: {self.detail}")


class Link:
    """A live socket: our requests, home's requests, and bookkeeping."""

    def __init__(self, ws: ClientConnection, url: str, index: int, handler: Handler,
                 clock_offset: float = 0.0) -> None:
        self.ws = ws
        self.url = url
        self.index = index
        self.handler = handler
        self.session = p.Session(role=p.Role.AGENT, clock_offset=clock_offset)
        self.opened_at = time.monotonic()
        self.in_flight = 0
        self.last_request_at = 0.0
        self.served = 0
        self.draining = False
        self._waiters: dict[str, asyncio.Future] = {}
        self._tasks: set[asyncio.Task] = set()
        self._serving: dict[str, asyncio.Task] = {}
        self.hello_response: p.Message | None = None
        self.hello_sent_at = 0.0
        self.hello_rtt = 0.0

    # ---- sending

    async def flush(self) -> None:
        """Send everything the session queued, in order."""
        for text in self.session.data_to_send():
            await self.ws.send(text)

    async def request(self, op: p.Op, body: dict, timeout: float = 30.0) -> p.Message:
        """Send a request and wait for its response; RequestFailed on an error."""
        message = self.session.request(op, body)
        future = asyncio.get_running_loop().create_future()
        self._waiters[message.id] = future
        try:
            await self.flush()
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            self.session.forget(message.id)
            raise
        finally:
            self._waiters.pop(message.id, None)

    async def event(self, op: p.Op, body: dict) -> None:
        self.session.event(op, body)
        await self.flush()

    # ---- receiving

    async def run(self) -> None:
        """Read until the socket closes; then fail whatever still waits."""
        try:
            async for data in self.ws:
                self.session.receive(data)
                self._dispatch(self.session.events_received())
                await self.flush()
        except ConnectionClosed:
            pass
        finally:
            for future in self._waiters.values():
                if not future.done():
                    future.set_exception(ConnectionError(f"socket to {self.url} closed"))
            for task in list(self._tasks):
                task.cancel()

    def _dispatch(self, events: list) -> None:
        for event in events:
            if isinstance(event, (p.ResponseReceived, p.ErrorReceived)):
                self._resolve(event)
            elif isinstance(event, p.RequestReceived):
                self._start(event.message)
            elif isinstance(event, p.CancelReceived):
                self._cancel(event.request)
            elif isinstance(event, p.ProtocolViolation):
                log.warning("home sent an invalid message: %s", event.error,
                            extra={"tether_error": event.error.code.value,
                                   "tether_url": self.url})
            elif isinstance(event, p.AckReceived):
                pass  # streaming acks are consumed by the directory stream handler
            else:
                log.debug("ignored %s", type(event).__name__)

    def _resolve(self, event) -> None:
        message = event.message
        future = self._waiters.get(message.re or "")
        if future is None or future.done():
            if isinstance(event, p.ErrorReceived):
                log.warning("home reported an error: %s %s", message.body.get("code"),
                            message.body.get("detail"),
                            extra={"tether_error": message.body.get("code")})
            return
        if isinstance(event, p.ErrorReceived):
            future.set_exception(RequestFailed(message))
        else:
            future.set_result(message)

    def _start(self, message: p.Message) -> None:
        self.in_flight += 1
        self.last_request_at = time.monotonic()
        task = asyncio.get_running_loop().create_task(self._serve(message))
        self._tasks.add(task)
        self._serving[message.id] = task
        task.add_done_callback(self._tasks.discard)

    def _cancel(self, request: p.Message) -> None:
        """Home withdrew a request (it timed out there): stop work, send nothing."""
        task = self._serving.get(request.id)
        if task is not None and not task.done():
            task.cancel()
        log.info("home cancelled %s %s", request.op.value, request.id,
                 extra={"tether_url": self.url})

    async def _serve(self, message: p.Message) -> None:
        try:
            body = await self.handler(self, message)
            if self.session.is_open(message):
                self.session.respond(message, body)
        except HandlerError as exc:
            if self.session.is_open(message):
                self.session.fail(message, exc.code, exc.detail)
        except asyncio.CancelledError:
            return
        except Exception as exc:  # noqa: BLE001 - a bug answers "internal", never kills us
            log.exception("handler for %s failed", message.op.value)
            if self.session.is_open(message):
                self.session.fail(message, p.ErrorCode.INTERNAL,
                                  f"agent error while serving {message.op.value}: {exc}")
        finally:
            self.in_flight -= 1
            self.served += 1
            self._serving.pop(message.id, None)
        try:
            await self.flush()
        except ConnectionClosed:
            log.warning("socket closed before the answer to %s could be sent",
                        message.op.value, extra={"tether_url": self.url})

    async def close(self, reason: str = "rotation") -> None:
        await self.ws.close(code=1001, reason=reason)
