"""One socket slot of the agent: keep a socket to home up and rotate it at its TTL.

The slot dials (failover and backoff from :class:`tether.agent.channel.DialPlan`),
sends heartbeats, and when the socket reaches its time-to-live opens the
replacement *first*, then drains the old one (:class:`SlotClock` says when it
may close without dropping a request). A slot manages its sockets only: it gets
a :class:`SlotContext` with what it needs (dialing, the socket pool, the
heartbeat body...), never the agent, which owns the identity, the configuration
and the request handlers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tether import protocol as p

from .backoff import Backoff
from .channel import DialPlan, SlotClock
from .dialer import DialOptions
from .homedialer import HomeDialer
from .link import Link
from .sockets import Sockets

log = logging.getLogger("tether.agent")


@dataclass
class SlotContext:
    """What every slot of one agent shares."""

    home_urls: list[str]
    dialer: HomeDialer
    #: the instance identity is valid, or was just enrolled (False once stopping)
    identity_ready: Callable[[], Awaitable[bool]]
    sockets: Sockets
    #: the socket time-to-live now (home's configuration may change it)
    ttl: Callable[[], float]
    drain_quiet_s: float
    heartbeat_body: Callable[[], dict]
    #: a new socket is up and registered: config ack, status line
    on_connected: Callable[[Link], Awaitable[None]]
    spawn: Callable[[Awaitable], asyncio.Task]
    stopping: asyncio.Event


class Slot:
    """Socket ``index`` of an agent."""

    def __init__(self, context: SlotContext, index: int) -> None:
        self.context = context
        self.index = index

    async def run(self) -> None:
        """Keep the socket up; replace it at its TTL before closing the old one."""
        ctx, index = self.context, self.index
        plan = DialPlan(list(ctx.home_urls), Backoff())
        clock = SlotClock(ttl=ctx.ttl(), drain_quiet=ctx.drain_quiet_s)
        options = ctx.dialer.options(ctx.dialer.instance_ssl)
        current: tuple[Link, asyncio.Task] | None = None
        expires = 0.0
        while not ctx.stopping.is_set():
            if current is None:
                plan.restart()
                current = await self._connect(plan, index, options)
                if current is None:
                    return
                expires = clock.expires_at(time.monotonic())
            link, reader = current
            done = await self._wait_reader(reader, expires - time.monotonic())
            if ctx.stopping.is_set():
                break
            if done:
                log.warning("socket %d to %s lost; reconnecting", index, link.url,
                            extra={"tether_url": link.url, "tether_socket": index})
                ctx.sockets.lost(index, link)
                current = None
                continue
            log.info("socket %d reached its TTL; opening the replacement first", index,
                     extra={"tether_socket": index})
            plan.restart()
            replacement = await self._connect(plan, index, options)
            if replacement is None:
                break
            ctx.spawn(self._drain(link, reader, clock))
            current = replacement
            clock.ttl = ctx.ttl()
            expires = clock.expires_at(time.monotonic())
        if current is not None:
            await current[0].close("agent stopping")

    async def _connect(self, plan: DialPlan, index: int,
                       options: DialOptions) -> tuple[Link, asyncio.Task] | None:
        """Dial (enrolling first if the identity is gone); register the live link."""
        ctx = self.context
        if not await ctx.identity_ready():
            return None
        got = await ctx.dialer.open(plan, index, options)
        if got is None:
            return None
        link, reader = got
        ctx.sockets.connected(index, link)
        ctx.spawn(self._heartbeats(link, reader))
        await ctx.on_connected(link)
        return got

    async def _wait_reader(self, reader: asyncio.Task, timeout: float) -> bool:
        """Wait for the reader to end (socket lost) or timeout/stop; True if it ended."""
        stop = asyncio.ensure_future(self.context.stopping.wait())
        try:
            await asyncio.wait({reader, stop}, timeout=max(0.0, timeout),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        return reader.done()

    async def _drain(self, link: Link, reader: asyncio.Task, clock: SlotClock) -> None:
        """Retire a rotated socket without dropping a request (see channel.SlotClock)."""
        self.context.sockets.retiring(link)
        since = time.monotonic()
        try:
            await link.event(p.Op.HEARTBEAT, {**self.context.heartbeat_body(), "draining": True})
        except Exception:  # noqa: BLE001 - already gone: nothing to drain
            pass
        while not reader.done() and not clock.may_close(
                since, link.last_request_at, link.in_flight, time.monotonic()):
            await asyncio.sleep(0.1)
        await link.close("rotation")
        self.context.sockets.retired(link)
        log.info("socket %d rotated: old socket closed after serving %d requests",
                 link.index, link.served, extra={"tether_socket": link.index})

    async def _heartbeats(self, link: Link, reader: asyncio.Task) -> None:
        """Heartbeat events at the interval home asked for in its hello response."""
        every = link.hello_response.body.get("heartbeat_seconds") or p.HEARTBEAT_SECONDS
        while not reader.done() and not link.draining:
            await asyncio.wait({reader}, timeout=float(every))
            if reader.done() or link.draining:
                return
            try:
                await link.event(p.Op.HEARTBEAT, self.context.heartbeat_body())
            except Exception:  # noqa: BLE001 - the socket is going; the slot reconnects
                return
