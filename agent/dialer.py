"""Dial home: one socket, with failover, backoff and the hello exchange.

Thin asyncio over :class:`tether.agent.channel.DialPlan`: the plan says which
URL and how long to wait; this module opens the WebSocket (pinned TLS 1.3,
client certificate, optional HTTP CONNECT proxy with basic auth, the
``tether.v1`` subprotocol, keep-alive pings) and says hello.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Callable

from websockets.asyncio.client import ClientConnection, connect

from tether import protocol as p

from .channel import DialPlan
from .link import Handler, Link, RequestFailed

log = logging.getLogger("tether.agent.dialer")

OPEN_TIMEOUT_S = 10.0
HELLO_TIMEOUT_S = 15.0


@dataclass
class DialOptions:
    """How sockets are opened; the TLS context changes after enrollment/renewal."""

    ssl_context: Callable[[], ssl.SSLContext]
    proxy: Callable[[], str | None]
    user_agent: str
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0


class HelloRefused(Exception):
    """Home answered hello with an error (unauthorized, revoked, ...)."""

    def __init__(self, failure: RequestFailed) -> None:
        super().__init__(str(failure))
        self.code = failure.code.value
        self.failure = failure


def explain(exc: BaseException) -> str:
    """What an operator should check for a failed dial (appended to the log line)."""
    name = type(exc).__name__
    if name in ("InvalidProxyStatus", "InvalidProxyMessage", "InvalidProxy"):
        return "check the proxy address and its user/password (firstboot or configuration)"
    if isinstance(exc, ssl.SSLError) or "SSL" in name or "certificate" in str(exc).lower():
        return "TLS refused: check the clock, home's name in its URL and the image credential"
    if isinstance(exc, HelloRefused):
        return f"home refused hello ({exc.code})"
    if isinstance(exc, (ConnectionRefusedError, OSError, asyncio.TimeoutError)):
        return "home unreachable: check outbound 443, DNS and the proxy setting"
    return "see the error"


async def open_socket(url: str, options: DialOptions) -> ClientConnection:
    """One WebSocket to ``url``; never uses proxies from the environment."""
    return await connect(
        url,
        ssl=options.ssl_context(),
        proxy=options.proxy(),  # None = direct (not "from the environment")
        subprotocols=[p.SUBPROTOCOL],
        max_size=p.MAX_FRAME_BYTES,
        compression=None,  # small JSON messages; saves ~100 KiB of zlib state per socket
        open_timeout=OPEN_TIMEOUT_S,
        ping_interval=options.ping_interval_s,
        ping_timeout=options.ping_timeout_s,
        close_timeout=5,
        user_agent_header=options.user_agent,
    )


async def say_hello(link: Link, body_for: Callable[[Link], dict]) -> p.Message:
    """Hello exchange; on ``stale`` take home's clock as offset and try once more."""
    for attempt in (1, 2):
        sent = time.time()
        try:
            response = await link.request(p.Op.HELLO, body_for(link), HELLO_TIMEOUT_S)
        except RequestFailed as failure:
            server_time = failure.body.get("server_time")
            if failure.code == p.ErrorCode.STALE.value and attempt == 1 \
                    and isinstance(server_time, (int, float)):
                link.session.clock_offset = server_time - time.time()
                log.warning("home says our clock is off by %+.1f s; using its time",
                            link.session.clock_offset)
                continue
            raise HelloRefused(failure) from None
        link.hello_rtt = time.time() - sent
        link.hello_sent_at = sent
        link.hello_response = response
        return response
    raise AssertionError("unreachable")


async def dial(plan: DialPlan, index: int, options: DialOptions, handler: Handler,
               hello_body: Callable[[Link], dict], stopping: asyncio.Event,
               on_failure: Callable[[str, BaseException], None] | None = None,
               ) -> tuple[Link, asyncio.Task] | None:
    """Connect slot ``index``, failing over and backing off until hello is accepted.

    Returns the established link and its reader task, or None once ``stopping``.
    """
    while not stopping.is_set():
        url = plan.url
        ws = None
        try:
            ws = await open_socket(url, options)
            link = Link(ws, url, index, handler)
            reader = asyncio.get_running_loop().create_task(link.run())
            try:
                await say_hello(link, hello_body)
            except BaseException:
                reader.cancel()
                raise
            plan.connected()
            log.info("socket %d connected to %s", index, url,
                     extra={"tether_url": url, "tether_socket": index})
            return link, reader
        except asyncio.CancelledError:
            if ws is not None:
                await ws.close()
            raise
        except Exception as exc:  # noqa: BLE001 - every failure means: next URL / back off
            if ws is not None:
                await ws.close()
            if on_failure is not None:
                on_failure(url, exc)
            delay = plan.failed()
            log.warning("socket %d: %s failed (%s: %s); next %s in %.1f s (%s)", index, url,
                        type(exc).__name__, exc, plan.url, delay, explain(exc),
                        extra={"tether_url": url, "tether_socket": index,
                               "tether_retry_s": round(delay, 2)})
            try:
                await asyncio.wait_for(stopping.wait(), delay)
            except asyncio.TimeoutError:
                pass
    return None
