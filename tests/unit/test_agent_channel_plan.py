"""Plain channel logic: backoff with full jitter, URL failover, TTL and drain."""

import random

import pytest

from tether.agent.backoff import Backoff
from tether.agent.channel import DialPlan, SlotClock


def test_backoff_windows_double_and_cap():
    b = Backoff(base=0.5, cap=60.0, rng=random.Random(1))
    ceilings = []
    for _ in range(12):
        ceilings.append(b.ceiling())
        b.next_delay()
    assert ceilings[:8] == [0.5, 1, 2, 4, 8, 16, 32, 60]
    assert set(ceilings[7:]) == {60.0}


def test_backoff_full_jitter_spreads_over_the_window():
    b = Backoff(base=1, cap=60, rng=random.Random(7), attempt=20)
    draws = [b.next_delay() for _ in range(2000)]
    assert max(draws) <= 60 and min(draws) >= 0
    assert min(draws) < 3 and max(draws) > 57  # the whole window, not a band near the cap
    assert 25 < sum(draws) / len(draws) < 35


def test_backoff_reset_and_huge_attempts():
    b = Backoff(rng=random.Random(0), attempt=10_000)
    assert b.ceiling() == 60.0
    b.reset()
    assert b.ceiling() == 0.5
    with pytest.raises(ValueError):
        Backoff(base=0)


def test_dial_plan_fails_over_without_waiting_then_backs_off():
    plan = DialPlan(["wss://a/", "wss://b/", "wss://c/"], Backoff(rng=random.Random(3)))
    assert plan.url == "wss://a/"
    assert plan.failed() == 0.0 and plan.url == "wss://b/"
    assert plan.failed() == 0.0 and plan.url == "wss://c/"
    delay = plan.failed()  # whole round failed
    assert 0 <= delay <= 0.5 and plan.url == "wss://a/"
    plan.failed(), plan.failed()
    assert 0 <= plan.failed() <= 1.0  # second round: window doubled


def test_dial_plan_sticks_to_working_url_and_restarts_at_primary():
    plan = DialPlan(["wss://dead/", "wss://live/"], Backoff(rng=random.Random(3)))
    plan.failed()
    plan.connected()
    assert plan.url == "wss://live/" and plan.backoff.attempt == 0
    plan.restart()
    assert plan.url == "wss://dead/"


def test_single_url_backs_off_every_time():
    plan = DialPlan(["wss://only/"], Backoff(base=1, cap=4, rng=random.Random(5)))
    delays = [plan.failed() for _ in range(6)]
    assert all(0 <= d <= 4 for d in delays)
    assert plan.backoff.attempt == 6
    with pytest.raises(ValueError):
        DialPlan([])


def test_ttl_jitter_shortens_only():
    clock = SlotClock(ttl=100, jitter=0.2, rng=random.Random(9))
    ends = [clock.expires_at(1000) for _ in range(200)]
    assert all(1080 <= e <= 1100 for e in ends) and len(set(ends)) > 100
    with pytest.raises(ValueError):
        SlotClock(ttl=0)
    with pytest.raises(ValueError):
        SlotClock(ttl=1, jitter=1)


def test_drain_waits_for_in_flight_and_quiet():
    c = SlotClock(ttl=60, drain_quiet=2, drain_max=30, drain_hard=300)
    assert not c.may_close(draining_since=100, last_request_at=0, in_flight=0, now=101)
    assert c.may_close(100, 0, 0, 102)
    assert not c.may_close(100, 0, 1, 150)          # a request is still running
    assert not c.may_close(100, 105, 0, 106)        # a request arrived while draining
    assert c.may_close(100, 105, 0, 107)
    assert c.may_close(100, 129.5, 0, 130)          # home keeps routing here: drain_max
    assert c.may_close(100, 0, 3, 400)              # hard bound
