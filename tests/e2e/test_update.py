"""Whole-image A/B updates under qemu, real RAUC and GRUB (issue 14).

One appliance, one qemu process (guest reboots stay in it; the disk is a
copy-on-write snapshot of the image): it boots slot A and checks in; home
publishes and rolls out a newer bundle cut from the image's own root
filesystem; the agent downloads it over its channel, RAUC installs it into
slot B, the appliance reboots into B, marks it good after home accepted its
hello and reports committed, as the same enrolled instance. A second good
bundle goes the other way: RAUC installs it from B into A (the grubenv lives
outside both slots) and slot A commits, still the same instance. Then a bundle
whose agent never starts is rolled out from A: RAUC installs it into B, the
trial boots of B never check in, the trial deadline reboots them, GRUB falls
back to A after three tries and the agent reports the rollback home.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import bootrun
import pytest
from homerig import start_home
import vm

from tether.home import paths, updatekeys

pytestmark = [pytest.mark.image, pytest.mark.slow]

#: Trial deadline of the bad rollout: the smallest the appliance accepts, so its three
#: failed trial boots take about 3 x (60 s + reboot).
DEADLINE = 60


def _update_status(home) -> dict:
    return json.loads(home.cli("update", "status", "--json").stdout)


def _wait_progress(machine, home, instance: str, version: str, states: tuple[str, ...],
                   timeout: float) -> dict:
    def found():
        rows = [r for r in _update_status(home)["progress"]
                if r["instance_id"] == instance and r["version"] == version]
        return rows[0] if rows and rows[0]["state"] in states else None
    return machine.wait_for(found, timeout, f"update {version} in {states}", interval=3.0)


def _running(home, instance: str) -> dict:
    return next(r for r in _update_status(home)["running"] if r["instance_id"] == instance)


@pytest.fixture(scope="module")
def appliance(boot_image, accelerator, boot_timeout, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("update")
    image_dir = boot_image.disk.parent
    manifest = json.loads((image_dir / "manifest.json").read_text())
    raucb = image_dir / f"{boot_image.name}.raucb"
    if not raucb.is_file() or not manifest.get("image_version"):
        pytest.skip(f"{image_dir} has no update bundle or image version: build it with `make image`")
    home = start_home(boot_image.home_state, tmp, boot_image.image_id, vm.GUEST_HOME_ADDRESS)
    boot = None
    try:
        boot = bootrun.start(boot_image, home, tmp / "vm", {"home.url": bootrun.HOME_URL}, accelerator)
        enrolled = boot.wait_enrolled(boot_timeout)
        boot.wait_checked_in(enrolled["instance"], boot_timeout)
        keys = updatekeys.UpdateKeys.of(paths.StatePaths(home.state))
        yield {"boot": boot, "home": home, "instance": enrolled["instance"], "tmp": tmp,
               "raucb": raucb, "version": manifest["image_version"], "keys": keys,
               "machine": boot.machine}
    finally:
        if boot is not None:
            boot.stop()
        home.stop()


def test_update_a_to_b_commits_as_the_same_instance(appliance):
    home, machine, instance = appliance["home"], appliance["machine"], appliance["instance"]
    first = appliance["version"]
    machine.wait_for(lambda: _running(home, instance)["image_version"] == first
                     if _update_status(home)["running"] else None, 120, "the hello's image version")
    assert _running(home, instance)["boot_slot"] == "A"
    v2 = f"{first}.1"
    good = bootrun.recut_bundle(appliance["raucb"], appliance["tmp"] / "v2.raucb", v2, appliance["keys"])
    assert f"published {v2}" in home.cli("update", "publish", str(good)).stdout
    started = time.monotonic()
    # the default trial deadline (300 s): a loaded host must not turn a slow good boot into a rollback
    home.cli("update", "rollout", v2, "--connector", home.connector)
    row = _wait_progress(machine, home, instance, v2, ("committed", "failed", "rolled_back"), 1500)
    appliance["figures"] = {"rollout_to_committed_s": round(time.monotonic() - started, 1)}
    assert row["state"] == "committed", row
    assert row["slot"] == "B"
    running = _running(home, instance)
    assert running["image_version"] == v2 and running["boot_slot"] == "B"
    assert len(home.events("enrolled")) == 1, "the updated appliance is the same enrolled instance"
    bootrun.TIMINGS.append(("update A->B", appliance["figures"]))


def test_second_update_b_to_a_commits_as_the_same_instance(appliance):
    """Issue 14 (c): the second update goes from B into A and commits there."""
    home, machine, instance = appliance["home"], appliance["machine"], appliance["instance"]
    if _running(home, instance)["boot_slot"] != "B":
        pytest.skip("needs the A->B update of the previous test")
    v3 = f"{appliance['version']}.2"
    good = bootrun.recut_bundle(appliance["raucb"], appliance["tmp"] / "v3.raucb", v3, appliance["keys"])
    assert f"published {v3}" in home.cli("update", "publish", str(good)).stdout
    started = time.monotonic()
    home.cli("update", "rollout", v3, "--connector", home.connector)
    row = _wait_progress(machine, home, instance, v3, ("committed", "failed", "rolled_back"), 1500)
    figures = {"rollout_to_committed_s": round(time.monotonic() - started, 1)}
    bootrun.TIMINGS.append(("update B->A", figures))
    assert row["state"] == "committed", row
    assert row["slot"] == "A"
    running = _running(home, instance)
    assert running["image_version"] == v3 and running["boot_slot"] == "A"
    assert len(home.events("enrolled")) == 1, "the twice-updated appliance is the same enrolled instance"


def test_bad_bundle_rolls_back_and_the_appliance_keeps_serving(appliance):
    home, machine, instance = appliance["home"], appliance["machine"], appliance["instance"]
    good = f"{appliance['version']}.2"
    running = _running(home, instance)
    if running["boot_slot"] != "A" or running["image_version"] != good:
        pytest.skip("needs the B->A update of the previous test")
    v4 = f"{appliance['version']}.3"
    bad = bootrun.recut_bundle(appliance["raucb"], appliance["tmp"] / "v4.raucb", v4, appliance["keys"], broken=True)
    home.cli("update", "publish", str(bad))
    started = time.monotonic()
    home.cli("update", "rollout", v4, "--connector", home.connector, "--trial-deadline", str(DEADLINE))
    # installed from A into B, a third install with grubenv outside the slots
    installed = _wait_progress(machine, home, instance, v4, ("rebooting", "rolled_back", "failed"), 900)
    assert installed["state"] != "failed", installed
    row = _wait_progress(machine, home, instance, v4, ("rolled_back", "committed", "failed"), 1800)
    figures = {"rollout_to_rolled_back_s": round(time.monotonic() - started, 1)}
    bootrun.TIMINGS.append(("rollback", figures))
    assert row["state"] == "rolled_back", row
    assert "never became healthy" in row["detail"]
    # the failed slot's own journal, kept at its last shutdown: the trial deadline rebooted it
    assert "not marked good" in (row["journal"] or ""), row["journal"]
    running = _running(home, instance)
    assert running["boot_slot"] == "A" and running["image_version"] == good
    text = home.cli("update", "status").stdout
    assert f"{v4} rolled_back" in text
    # not offered again to the instance where it rolled back
    reply = home.cli("update", "rollout", v4, "--connector", home.connector).stdout
    assert "offered now to 0 instance(s)" in reply
