"""The drain: send each directory's spool home with `directory.changes`, ack what home applied.

Why one asyncio task and not one per follower thread: sending needs a live
link, and links live on the event loop. The followers (threads) only append
to the spool and poke the drain (`poke`, thread-safe) so a change leaves in
milliseconds, not at the next poll. Entries stay in the spool until home says
`applied_through`; a lost socket or a timeout simply means the same seqs are
sent again (home applies each seq once), so nothing is lost while home is away.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from tether import protocol as p

from ..backoff import Backoff
from .managed import ManagedDirectory, encoded_size, split_by_size

if TYPE_CHECKING:
    from .bridge import Bridge

log = logging.getLogger("tether.agent.directory")

#: Room for the envelope and the body's other fields inside one frame.
BATCH_BUDGET = p.MAX_FRAME_BYTES - 4096
#: Spool entries read per batch (each at most managed.ENTRY_BUDGET bytes).
READ_AHEAD = 32
#: Seconds between looks for a link while changes wait and no socket is up.
LINK_POLL = 0.5
#: Seconds between looks when the spools are empty (a missed poke costs at most this).
IDLE_POLL = 5.0
REQUEST_TIMEOUT = 60.0


class DrainError(Exception):
    """Home's answer (or a spool entry) makes this batch impossible to complete now."""


class Drain:
    """Moves spooled changes home over whichever link is up; one batch at a time, in order."""

    def __init__(self, bridge: Bridge):
        self.bridge = bridge
        self.wake: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task | None = None
        self.backoff = Backoff(base=0.2, cap=10.0)
        self.last_error: str | None = None
        self.sent_batches = 0

    # ---- lifecycle

    def start(self) -> None:
        """Start the task on the running loop (idempotent; no-op without a loop)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # configured before the loop runs: handle()/configure() start it later
        if self.task is not None and not self.task.done() and self.loop is loop:
            return
        self.loop, self.wake = loop, asyncio.Event()
        self.task = loop.create_task(self.run(), name="directory-drain")

    async def stop(self) -> None:
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def poke(self) -> None:
        """Something was spooled (any thread): drain now instead of at the next poll."""
        loop, wake = self.loop, self.wake
        if loop is None or wake is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(wake.set)
        except RuntimeError:
            pass  # the loop closed in between: the spool keeps the change for next time

    # ---- the loop

    async def run(self) -> None:
        while True:
            self.wake.clear()
            try:
                progressed = await self.drain_all()
                self.backoff.reset()
                self.last_error = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: keep the spool, retry later
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("directory changes not delivered yet: %s", self.last_error)
                await self._nap(self.backoff.next_delay())
                continue
            if not progressed:
                await self._nap(LINK_POLL if self.bridge.has_pending() else IDLE_POLL)

    async def _nap(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.wake.wait(), seconds)
        except TimeoutError:
            pass

    async def drain_all(self) -> bool:
        """One batch per directory with pending changes; True if any batch was sent."""
        progressed = False
        for directory in list(self.bridge.directories.values()):
            link = self.pick_link()
            if link is None:
                return progressed
            if await self.drain_one(link, directory):
                progressed = True
        return progressed

    def pick_link(self):
        """An established link home that is not being rotated out, or None."""
        links = getattr(self.bridge.agent, "links", {}) or {}
        return next((ln for ln in links.values() if not ln.draining), None)

    async def drain_one(self, link, directory: ManagedDirectory) -> bool:
        """Send the oldest pending entries of `directory`; ack what home applied."""
        pending = await asyncio.to_thread(directory.spool.pending, READ_AHEAD)
        if not pending:
            return False
        batch = next(split_by_size(({"seq": s, "message": m} for s, m in pending), BATCH_BUDGET))
        if len(batch) == 1 and encoded_size(batch[0]) > BATCH_BUDGET:
            raise DrainError(f"spool entry {batch[0]['seq']} of directory {directory.id!r} is "
                             f"{encoded_size(batch[0])} bytes, more than one protocol frame; "
                             "move it aside and request a full sync")
        response = await link.request(p.Op.DIRECTORY_CHANGES,
                                      {"directory": directory.id, "entries": batch},
                                      timeout=REQUEST_TIMEOUT)
        first, last = batch[0]["seq"], batch[-1]["seq"]
        applied = min(int(response.body["applied_through"]), last)  # never drop unsent entries
        if applied >= first:
            await asyncio.to_thread(directory.spool.ack, applied)
        self.sent_batches += 1
        if response.body.get("leader") is False:
            await self.bridge.resign(directory)
        elif applied < first:
            raise DrainError(f"home applied none of seqs {first}..{last} of directory "
                             f"{directory.id!r} (applied_through {response.body['applied_through']})")
        return True
