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
from collections import deque
from collections.abc import Awaitable, Callable

from tether import protocol as p

from ..backoff import Backoff
from ..sockets import Sockets
from .managed import ManagedDirectory

log = logging.getLogger("tether.agent.directory")

#: Room for the envelope and the body's other fields inside one frame.
BATCH_BUDGET = p.MAX_FRAME_BYTES - 4096
#: Spool entries read per batch (each at most managed.ENTRY_BUDGET bytes).
READ_AHEAD = 32
#: Bytes `{"seq":N,"message":...}` and its comma add to an entry inside the frame.
ENTRY_OVERHEAD = 40
#: Batches in flight per directory (home applies them in order; see drain_one).
WINDOW = 3
#: Batches settled per directory before the others get their turn.
MAX_BATCHES = 16
#: Seconds between looks for a link while changes wait and no socket is up.
LINK_POLL = 0.5
#: Seconds between looks when the spools are empty (a missed poke costs at most this).
IDLE_POLL = 5.0
REQUEST_TIMEOUT = 60.0


class DrainError(Exception):
    """Home's answer (or a spool entry) makes this batch impossible to complete now."""


class Drain:
    """Moves spooled changes home over whichever link is up, in order, a few batches in flight.

    It gets what it needs, not the bridge: ``directories()`` (the configured ones
    now), the agent's socket pool, and ``resign(directory)`` for when home names
    another leader.
    """

    def __init__(self, directories: Callable[[], list[ManagedDirectory]], sockets: Sockets,
                 resign: Callable[[ManagedDirectory], Awaitable[None]]):
        self.directories = directories
        self.sockets = sockets
        self.resign = resign
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
                await self._nap(LINK_POLL if self.has_pending() else IDLE_POLL)

    def has_pending(self) -> bool:
        return any(len(d.spool) for d in self.directories())

    async def _nap(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.wake.wait(), seconds)
        except TimeoutError:
            pass

    async def drain_all(self) -> bool:
        """One batch per directory with pending changes; True if any batch was sent."""
        progressed = False
        for directory in self.directories():
            link = self.pick_link()
            if link is None:
                return progressed
            if await self.drain_one(link, directory):
                progressed = True
        return progressed

    def pick_link(self):
        """An established link home that is not being rotated out, or None."""
        return self.sockets.pick()

    async def drain_one(self, link, directory: ManagedDirectory) -> bool:
        """Send `directory`'s oldest pending entries, up to WINDOW batches in flight.

        Why a window: waiting for each answer before reading and sending the
        next batch left home idle while the agent read, and the agent idle while
        home applied. Answers are settled in send order (acks are cumulative);
        every batch but the first names the previous one's last seq (`after`),
        so home never applies a batch without the one before it.
        """
        inflight: deque[tuple[list, asyncio.Task]] = deque()
        sent_through = 0  # last seq sent in this window (0: none yet)
        settled = 0
        try:
            while settled < MAX_BATCHES:
                while len(inflight) < WINDOW and settled + len(inflight) < MAX_BATCHES:
                    batch = await self._next_batch(directory, sent_through)
                    if not batch:
                        break
                    after = sent_through or None
                    inflight.append((batch, asyncio.ensure_future(
                        self._send(link, directory, batch, after))))
                    sent_through = batch[-1][0]
                if not inflight:
                    break
                batch, task = inflight.popleft()
                settled += 1
                if not await self._settle(directory, batch, await task):
                    break
        finally:
            for _, task in inflight:
                task.cancel()  # their answers no longer matter: the spool re-sends them
                task.add_done_callback(_consume)
        return settled > 0

    async def _next_batch(self, directory: ManagedDirectory, after: int) -> list[tuple[int, bytes]]:
        """Pending entries above seq `after` that fit one frame (at least one entry)."""
        pending = await asyncio.to_thread(directory.spool.pending_raw, READ_AHEAD, after)
        batch, size = [], 2
        for seq, data in pending:
            n = len(data) + ENTRY_OVERHEAD
            if batch and size + n > BATCH_BUDGET:
                break
            batch.append((seq, data))
            size += n
        if len(batch) == 1 and size > BATCH_BUDGET:
            raise DrainError(f"spool entry {batch[0][0]} of directory {directory.id!r} is "
                             f"{len(batch[0][1])} bytes, more than one protocol frame; "
                             "move it aside and request a full sync")
        return batch

    async def _send(self, link, directory: ManagedDirectory, batch: list[tuple[int, bytes]],
                    after: int | None) -> p.Message:
        """One `directory.changes` request; spool bytes go into the frame unparsed."""
        body = {"directory": directory.id,
                "entries": [{"seq": seq, "message": p.RawJSON(data)} for seq, data in batch]}
        if after is not None:
            body["after"] = after
        return await link.request(p.Op.DIRECTORY_CHANGES, body, timeout=REQUEST_TIMEOUT)

    async def _settle(self, directory: ManagedDirectory, batch: list, response: p.Message) -> bool:
        """Ack what home applied of `batch`; False when the window must stop here."""
        first, last = batch[0][0], batch[-1][0]
        applied = min(int(response.body["applied_through"]), last)  # never drop unsent entries
        if applied >= first:
            await asyncio.to_thread(directory.spool.ack, applied)
        self.sent_batches += 1
        if response.body.get("leader") is False:
            await self.resign(directory)
            return False
        if applied < first:
            raise DrainError(f"home applied none of seqs {first}..{last} of directory "
                             f"{directory.id!r} (applied_through {response.body['applied_through']})")
        return True


def _consume(task: asyncio.Task) -> None:
    """Retrieve an abandoned request's outcome so asyncio does not report it as lost."""
    if not task.cancelled():
        task.exception()
