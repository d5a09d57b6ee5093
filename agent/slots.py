"""One socket slot of the agent: keep a socket to home up and rotate it at its TTL.

The slot dials (failover and backoff from :class:`tether.agent.channel.DialPlan`),
sends heartbeats, and when the socket reaches its time-to-live opens the
replacement *first*, then drains the old one (:class:`SlotClock` says when it
may close without dropping a request). The agent owns the identity, the
configuration and the request handlers; a slot only manages its sockets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from tether import protocol as p

from .backoff import Backoff
from .channel import DialPlan, SlotClock
from .dialer import dial
from .link import Link

if TYPE_CHECKING:
    from .service import Agent

log = logging.getLogger("tether.agent")


class Slot:
    """Socket ``index`` of ``agent``."""

    def __init__(self, agent: "Agent", index: int) -> None:
        self.agent = agent
        self.index = index

    async def run(self) -> None:
        """Keep the socket up; replace it at its TTL before closing the old one."""
        agent, index = self.agent, self.index
        plan = DialPlan(list(agent.settings.home_urls), Backoff())
        clock = SlotClock(ttl=agent.ttl(), drain_quiet=agent.options.drain_quiet_s)
        options = agent.dial_options(agent.instance_ssl)
        current: tuple[Link, asyncio.Task] | None = None
        expires = 0.0
        while not agent.stopping.is_set():
            if current is None:
                plan.restart()
                current = await self._connect(plan, index, options)
                if current is None:
                    return
                expires = clock.expires_at(time.monotonic())
            link, reader = current
            done = await self._wait_reader(reader, expires - time.monotonic())
            if agent.stopping.is_set():
                break
            if done:
                log.warning("socket %d to %s lost; reconnecting", index, link.url,
                            extra={"tether_url": link.url, "tether_socket": index})
                if agent.links.get(index) is link:
                    del agent.links[index]
                current = None
                continue
            log.info("socket %d reached its TTL; opening the replacement first", index,
                     extra={"tether_socket": index})
            plan.restart()
            replacement = await self._connect(plan, index, options)
            if replacement is None:
                break
            agent.spawn(self._drain(link, reader, clock))
            current = replacement
            clock.ttl = agent.ttl()
            expires = clock.expires_at(time.monotonic())
        if current is not None:
            await current[0].close("agent stopping")

    async def _connect(self, plan: DialPlan, index: int,
                       options) -> tuple[Link, asyncio.Task] | None:
        """Dial (enrolling first if the identity is gone); register the live link."""
        agent = self.agent
        if not agent.has_identity() and not await agent.ensure_enrolled():
            return None
        got = await dial(plan, index, options, agent.handle, agent.hello_body,
                         agent.stopping, agent.note_failure)
        if got is None:
            return None
        link, reader = got
        agent.after_hello(link)
        agent.links[index] = link
        agent.spawn(self._heartbeats(link, reader))
        await agent.send_config_ack(link)
        agent.notify_status()
        return got

    async def _wait_reader(self, reader: asyncio.Task, timeout: float) -> bool:
        """Wait for the reader to end (socket lost) or timeout/stop; True if it ended."""
        stop = asyncio.ensure_future(self.agent.stopping.wait())
        try:
            await asyncio.wait({reader, stop}, timeout=max(0.0, timeout),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        return reader.done()

    async def _drain(self, link: Link, reader: asyncio.Task, clock: SlotClock) -> None:
        """Retire a rotated socket without dropping a request (see channel.SlotClock)."""
        link.draining = True
        self.agent.draining.add(link)
        since = time.monotonic()
        try:
            await link.event(p.Op.HEARTBEAT, {**self.agent.heartbeat_body(), "draining": True})
        except Exception:  # noqa: BLE001 - already gone: nothing to drain
            pass
        while not reader.done() and not clock.may_close(
                since, link.last_request_at, link.in_flight, time.monotonic()):
            await asyncio.sleep(0.1)
        await link.close("rotation")
        self.agent.draining.discard(link)
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
                await link.event(p.Op.HEARTBEAT, self.agent.heartbeat_body())
            except Exception:  # noqa: BLE001 - the socket is going; the slot reconnects
                return
