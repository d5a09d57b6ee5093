"""home.ratelimit: buckets refill at their rate, cap at their burst, and the key table stays bounded."""

from tether.home.ratelimit import RateLimit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_refusal_then_refill():
    clock = Clock()
    limit = RateLimit(rate=2.0, burst=3, clock=clock)
    assert [limit.allow("a") for _ in range(4)] == [True, True, True, False]
    assert limit.retry_after("a") == 0.5
    clock.now += 0.5
    assert limit.allow("a") and not limit.allow("a")
    clock.now += 100
    assert [limit.allow("a") for _ in range(4)] == [True, True, True, False]


def test_keys_are_independent():
    limit = RateLimit(rate=1.0, burst=1, clock=Clock())
    assert limit.allow("a") and not limit.allow("a")
    assert limit.allow("b")


def test_key_table_is_bounded_oldest_evicted():
    limit = RateLimit(rate=1.0, burst=1, max_keys=100, clock=Clock())
    for i in range(10_000):
        limit.allow(f"k{i}")
    assert len(limit) == 100
    assert not limit.allow("k9999")  # newest kept, still empty
    assert limit.allow("k0")  # evicted long ago: a fresh bucket


def test_refused_spend_takes_nothing():
    clock = Clock()
    limit = RateLimit(rate=1.0, burst=2, clock=clock)
    assert limit.allow("a", cost=2)
    assert not limit.allow("a", cost=2)
    clock.now += 1
    assert not limit.allow("a", cost=2)
    clock.now += 1
    assert limit.allow("a", cost=2)
