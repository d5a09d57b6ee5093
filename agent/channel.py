"""Plain channel logic: which URL to dial, when, and when a socket must rotate.

No sockets, no asyncio: the dialer (:mod:`tether.agent.dialer`) asks these
objects what to do and tells them what happened, so failover, backoff and the
time-to-live schedule are unit-tested with a fake clock.

Failover (:class:`DialPlan`): home URLs are tried in the order given; a failed
attempt moves to the next URL at once, and only when a whole round of URLs has
failed does the slot wait (exponential backoff, full jitter, 60 s cap). After a
successful hello the backoff is reset; each new connection (including a TTL
replacement) starts again from the first URL, so the agent falls back to the
primary home once it is back.

Rotation (:class:`SlotClock`): a connection lives ``ttl`` seconds (minus up to
``jitter`` of it, so the sockets of one agent and of a fleet do not all rotate
at once). When it is due, the slot dials a replacement *while the old one keeps
serving*; once the replacement's hello is accepted, the old socket drains (it
announces ``draining`` to home, answers what is in flight, stays open for a
quiet period in which home can still deliver requests it had already routed
there) and closes. So rotation never leaves the slot without a socket.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .backoff import Backoff


@dataclass
class DialPlan:
    """Failover order plus backoff for one socket slot."""

    urls: list[str]
    backoff: Backoff = field(default_factory=Backoff)
    index: int = 0
    failures_in_round: int = 0

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("at least one home URL is needed")

    @property
    def url(self) -> str:
        """The URL to dial next."""
        return self.urls[self.index % len(self.urls)]

    def failed(self) -> float:
        """Record a failed attempt on :attr:`url`; return the delay before the next."""
        self.index = (self.index + 1) % len(self.urls)
        self.failures_in_round += 1
        if self.failures_in_round < len(self.urls):
            return 0.0  # fail over to the next URL at once
        self.failures_in_round = 0
        return self.backoff.next_delay()

    def connected(self) -> None:
        """Hello accepted on :attr:`url`: forget past failures."""
        self.failures_in_round = 0
        self.backoff.reset()

    def restart(self) -> None:
        """A fresh connection (after a drop or for rotation) starts at the primary."""
        self.index = 0
        self.failures_in_round = 0


@dataclass
class SlotClock:
    """Time-to-live and drain bookkeeping of one socket slot."""

    ttl: float
    jitter: float = 0.1
    drain_quiet: float = 2.0
    drain_max: float = 30.0
    drain_hard: float = 300.0
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        if self.ttl <= 0:
            raise ValueError(f"socket TTL must be > 0 s, got {self.ttl}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"TTL jitter must be in [0, 1), got {self.jitter}")

    def expires_at(self, opened_at: float) -> float:
        """When a connection opened at ``opened_at`` should be replaced."""
        return opened_at + self.ttl * (1 - self.rng.uniform(0, self.jitter))

    def may_close(self, draining_since: float, last_request_at: float,
                  in_flight: int, now: float) -> bool:
        """Whether a draining socket can close now without dropping anything.

        It stays while requests are in flight and until ``drain_quiet`` seconds
        passed without a new request (home may have routed one before it saw
        the drain notice). If home keeps routing to it, ``drain_max`` ends the
        wait for quiet, still only between requests; ``drain_hard`` bounds even
        a request that never finishes.
        """
        waited = now - draining_since
        if waited >= self.drain_hard:
            return True
        if in_flight:
            return False
        quiet = now - max(draining_since, last_request_at)
        return waited >= self.drain_max or quiet >= self.drain_quiet
