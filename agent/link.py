"""One WebSocket to home: a :class:`tether.protocol.Connection` with the agent's policy.

The protocol's connection moves text, waits for answers, streams and serves;
what is the agent's own is kept here: which handler serves home's requests
(config.push, status, directory operations), the hello bookkeeping the slots
read (:attr:`Link.hello_response`, its round trip), the socket's index and
whether it drains, and how home's mistakes are logged.
"""

from __future__ import annotations

import logging
import time
from typing import Awaitable, Callable

from tether import protocol as p

# One exception per concept, owned by the protocol; kept importable from here.
HandlerError = p.HandlerError
RequestFailed = p.RequestFailed

log = logging.getLogger("tether.agent.link")

#: handler(link, request message) -> response body; raise HandlerError to fail it.
Handler = Callable[["Link", p.Message], Awaitable[dict]]


class Link(p.Connection):
    """A live socket to home, number ``index`` of the agent's slots."""

    def __init__(self, ws, url: str, index: int, handler: Handler,
                 clock_offset: float = 0.0) -> None:
        super().__init__(ws, p.Session(role=p.Role.AGENT, clock_offset=clock_offset), name=url)
        self.url = url
        self.index = index
        self.handler = handler
        self.opened_at = time.monotonic()
        self.draining = False
        self.hello_response: p.Message | None = None
        self.hello_sent_at = 0.0
        self.hello_rtt = 0.0

    async def handle_request(self, message: p.Message) -> dict:
        return await self.handler(self, message)

    def internal_detail(self, message: p.Message, exc: Exception) -> str:
        return f"agent error while serving {message.op.value}: {exc}"

    def on_event(self, event) -> None:
        if isinstance(event, p.ErrorReceived):
            log.warning("home reported an error: %s %s", event.message.body.get("code"),
                        event.message.body.get("detail"),
                        extra={"tether_error": event.message.body.get("code")})
        elif isinstance(event, p.CancelReceived):
            log.info("home cancelled %s %s", event.request.op.value, event.request.id,
                     extra={"tether_url": self.url})
        elif isinstance(event, p.ProtocolViolation):
            log.warning("home sent an invalid message: %s", event.error,
                        extra={"tether_error": event.error.code.value, "tether_url": self.url})
        else:
            log.debug("ignored %s", type(event).__name__)

    async def close(self, reason: str = "rotation") -> None:
        await self.ws.close(code=1001, reason=reason)
