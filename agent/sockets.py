"""The agent's live sockets home: one per slot, and those being drained after rotation.

Why a pool of its own: the slots fill it, and every part that needs "a socket
home" only reads it: the directory drain and certificate renewal pick a link,
the updater sends its reports over one, the status body lists them. Each gets
this pool, never the agent that owns it (the shape of uvicorn's ``ServerState``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .link import Link


class Sockets:
    """Slot index -> its established link, plus the rotated-out links still draining."""

    def __init__(self) -> None:
        self.live: dict[int, Link] = {}
        self.draining: set[Link] = set()

    # ---- the slots

    def connected(self, index: int, link: Link) -> None:
        """Slot ``index``'s hello was accepted on ``link`` (a replacement takes the place)."""
        self.live[index] = link

    def lost(self, index: int, link: Link) -> None:
        """``link`` of slot ``index`` died; a replacement registered since stays."""
        if self.live.get(index) is link:
            del self.live[index]

    def retiring(self, link: Link) -> None:
        """A rotated-out link drains: no new work is started on it."""
        link.draining = True
        self.draining.add(link)

    def retired(self, link: Link) -> None:
        self.draining.discard(link)

    # ---- the readers

    def links(self) -> list[Link]:
        """The slots' current links (some may be draining)."""
        return list(self.live.values())

    def pick(self) -> Link | None:
        """An established link that is not being rotated out, or None."""
        return next((ln for ln in self.live.values() if not ln.draining), None)

    def up(self) -> int:
        """How many slots have a link that takes new work."""
        return sum(1 for ln in self.live.values() if not ln.draining)

    def describe(self, now: float) -> list[dict]:
        """One row per open socket (live and draining), for the status body."""
        return [{"index": ln.index, "url": ln.url, "age_s": round(now - ln.opened_at, 3),
                 "served": ln.served, "in_flight": ln.in_flight, "draining": ln.draining}
                for ln in [*self.live.values(), *self.draining]]
