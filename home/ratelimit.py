"""Token buckets keyed by peer, with a bounded number of keys.

Why one small module: home has several things an authenticated peer can do
cheaply and home pays for dearly (enrolments, renewals, clone records, error
frames, log lines, API calls). Each gets a :class:`RateLimit` with its own
rate and burst; the key is whoever pays (an image id, an instance id, a
socket, an API client). The table of keys is itself bounded: a peer that
invents keys (fresh socket after fresh socket) evicts the oldest buckets
instead of growing home's memory. An evicted key starts again with a full
bucket, which is no worse than a new peer.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimit:
    """At most ``burst`` events at once and ``rate`` per second on average, per key."""

    def __init__(self, rate: float, burst: float, *, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate must be > 0, burst >= 1 and max_keys >= 1")
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def allow(self, key: str, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens from ``key``'s bucket; False (and nothing taken) when empty."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(self.burst, now)
            self._buckets[key] = bucket
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
        if bucket.tokens < cost:
            return False
        bucket.tokens -= cost
        return True

    def retry_after(self, key: str, cost: float = 1.0) -> float:
        """Seconds until ``key`` may spend ``cost`` again (0 when it may now)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return 0.0
        tokens = min(self.burst, bucket.tokens + (self._clock() - bucket.stamp) * self.rate)
        return max(0.0, (cost - tokens) / self.rate)

    def forget(self, key: str) -> None:
        """Drop ``key``'s bucket (its peer is gone)."""
        self._buckets.pop(key, None)

    def __len__(self) -> int:
        return len(self._buckets)
