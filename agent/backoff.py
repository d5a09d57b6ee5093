"""Exponential backoff with full jitter, capped (the AWS architecture-blog scheme).

Every agent of a fleet reconnects at once when home restarts; "full jitter"
(``uniform(0, min(cap, base * 2**n))``) spreads them over the whole window so
home is not hit by a thundering herd, and the cap (60 s) bounds how long an agent
stays away after home is back.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

CAP_S = 60.0
BASE_S = 0.5


@dataclass
class Backoff:
    """Delay before the next attempt; ``reset()`` after a success."""

    base: float = BASE_S
    cap: float = CAP_S
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def __post_init__(self) -> None:
        if self.base <= 0 or self.cap < self.base:
            raise ValueError(f"backoff needs 0 < base <= cap, got base={self.base} cap={self.cap}")

    def ceiling(self) -> float:
        """Upper bound of the current window: min(cap, base * 2**attempt)."""
        # Cap the exponent so huge attempt counts cannot overflow a float.
        return min(self.cap, self.base * (2 ** min(self.attempt, 63)))

    def next_delay(self) -> float:
        """Draw a delay from the current window and widen the window."""
        delay = self.rng.uniform(0.0, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0
