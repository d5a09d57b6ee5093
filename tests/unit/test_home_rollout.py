"""Rollout rules of whole-image updates (home.rollout): one per cluster, canary, no re-offer after rollback."""

import pytest

from tether import imageversion
from tether.home import rollout as r

V = "0.1.0.20261205100000"
OLD = "0.1.0.20261201000000"


def _fleet(*clusters):
    return [r.Instance(f"i{n}", cluster, OLD) for n, cluster in enumerate(clusters)]


def test_one_instance_per_cluster_at_a_time():
    fleet = _fleet("c1", "c1", "c2")
    plan = r.Rollout(V, "office")
    assert r.to_offer(plan, fleet) == ["i0", "i2"]
    fleet[0].state, fleet[2].state = r.OFFERED, r.DOWNLOADING
    assert r.to_offer(plan, fleet) == []
    fleet[0].state = r.COMMITTED
    assert r.to_offer(plan, fleet) == ["i1"]


def test_a_cluster_busy_elsewhere_gets_no_offer():
    """Another connector of the cluster (or another version) is updating one of its instances."""
    fleet = _fleet("c1", "c2")
    assert r.to_offer(r.Rollout(V, "office"), fleet, busy={"c1"}) == ["i1"]


def test_canaries_are_the_first_instances_that_take_the_version():
    fleet = _fleet("a", "a", "a")
    fleet[0].version = V  # runs it already: no canary, it holds nothing back
    plan = r.Rollout(V, "office", canary=1)
    assert r.to_offer(plan, fleet) == ["i1"]
    fleet[1].state = r.ROLLED_BACK
    fleet[1].rolled_back.add(V)
    assert r.to_offer(plan, fleet) == [], "the canary rolled back: the rollout stops"
    fleet[1].state, fleet[1].rolled_back = r.COMMITTED, set()
    assert r.to_offer(plan, fleet) == ["i2"]


def test_canary_first_then_the_rest_after_they_committed():
    fleet = _fleet("a", "b", "c", "d")
    plan = r.Rollout(V, "office", canary=1)
    assert r.to_offer(plan, fleet) == ["i0"]
    fleet[0].state = r.REBOOTING
    assert r.to_offer(plan, fleet) == []
    fleet[0].state = r.COMMITTED
    assert r.to_offer(plan, fleet) == ["i1", "i2", "i3"]


def test_a_canary_that_rolled_back_stops_the_rollout():
    fleet = _fleet("a", "b")
    plan = r.Rollout(V, "office", canary=1)
    fleet[0].state = r.ROLLED_BACK
    fleet[0].rolled_back.add(V)
    assert r.to_offer(plan, fleet) == []


def test_a_version_that_rolled_back_is_never_offered_again():
    inst = r.Instance("i0", "a", OLD, rolled_back={V})
    assert r.to_offer(r.Rollout(V, "office"), [inst]) == []
    assert r.to_offer(r.Rollout("0.1.0.20261206000000", "office"), [inst]) == ["i0"]


def test_only_newer_versions_are_offered():
    same = r.Instance("i0", "a", V)
    newer = r.Instance("i1", "b", "0.2.0.1")
    assert r.to_offer(r.Rollout(V, "office"), [same, newer]) == []


def test_paused_and_aborted_offer_nothing():
    fleet = _fleet("a")
    assert r.to_offer(r.Rollout(V, "office", paused=True), fleet) == []
    assert r.to_offer(r.Rollout(V, "office", aborted=True), fleet) == []


@pytest.mark.parametrize("current, new", [
    (r.OFFERED, r.DOWNLOADING), (r.DOWNLOADING, r.DOWNLOADING), (r.DOWNLOADING, r.INSTALLED),
    (r.INSTALLED, r.REBOOTING), (r.REBOOTING, r.COMMITTED), (r.REBOOTING, r.ROLLED_BACK),
    (r.OFFERED, r.FAILED),
])
def test_reports_in_order_are_accepted(current, new):
    assert r.transition(current, new) == new


@pytest.mark.parametrize("current, new", [
    (None, r.COMMITTED), (r.OFFERED, r.COMMITTED), (r.COMMITTED, r.DOWNLOADING), (r.REBOOTING, "bogus"),
])
def test_reports_out_of_order_are_refused(current, new):
    with pytest.raises(r.RolloutError):
        r.transition(current, new)


def test_versions_compare_as_integer_tuples():
    assert imageversion.newer("0.1.0.20261205100000", "0.1.0.20261201000000")
    assert imageversion.newer("0.10.0.1", "0.9.9.9")
    assert not imageversion.newer("0.1.0.1", "0.1.0.1")
    assert imageversion.newer("0.1.0.1", "garbage")
    for bad in ("", "1..2", "1.a", "-1", "1" * 30):
        with pytest.raises(imageversion.VersionError):
            imageversion.parse(bad)
