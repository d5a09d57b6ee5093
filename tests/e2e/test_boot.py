"""Power the finished image on under qemu and watch it reach a real home (issue 4).

Per run: a copy of the image's home state served on 127.0.0.1, the image
booted on a copy-on-write copy of its raw disk with the OVF's hardware
(4 vCPU, 8 GiB, NVMe, vmxnet3), restricted user networking, home reached
through guestfwd at 10.0.2.100:443, the home URL handed over on an OVF
ISO-transport CD. One VM at a time: each boot stops before the next starts.
"""

from __future__ import annotations

import json

import bootrun
import pytest
from homerig import start_home
import vm
from tether.agent import machine


pytestmark = [pytest.mark.image, pytest.mark.slow]

GiB = 1024 ** 3
RESOURCE_CHECKS = {"vcpu", "ram", "disk", "swap"}
STATIC = {"address": "10.0.2.50", "prefix": "24", "gateway": vm.GUEST_GATEWAY, "dns": vm.GUEST_DNS}
BAD_PROXY = "proxy.example:3128"  # no scheme: must be rejected, shown, reported


def _instance(home, instance_id: str) -> dict:
    return next(i for i in home.status()["instances"] if i["instance_id"] == instance_id)


def _wait_selfcheck(boot: bootrun.Boot, instance_id: str, timeout: float) -> dict:
    """The instance row once its check-in stored a self-check and listening list."""
    def ready():
        row = _instance(boot.home, instance_id)
        return row if row["selfcheck"] and row["listening"] is not None else None
    return boot.machine.wait_for(ready, timeout, "a self-check stored at home", interval=2.0)


@pytest.fixture(scope="module")
def deployed(boot_image, accelerator, boot_timeout, tmp_path_factory):
    """The image booted once with DHCP and home.url from the ISO; enrolled and checked in."""
    tmp = tmp_path_factory.mktemp("boot")
    home = start_home(boot_image.home_state, tmp, boot_image.image_id, vm.GUEST_HOME_ADDRESS)
    boot = None
    try:
        boot = bootrun.start(boot_image, home, tmp / "vm1", {"home.url": bootrun.HOME_URL},
                             accelerator)
        enrolled = boot.wait_enrolled(boot_timeout)
        boot.wait_checked_in(enrolled["instance"], boot_timeout)
        row = _wait_selfcheck(boot, enrolled["instance"], 120)
        probe = vm.probe_forwarded_port(boot.machine.cfg.ssh_probe_port)
        sources = bootrun.home_connection_sources(boot)
        bootrun.TIMINGS.append((f"first boot ({accelerator})", boot.timings))
        yield {"boot": boot, "home": home, "instance": row, "probe": probe, "tmp": tmp,
               "sources": sources}
    finally:
        if boot is not None:
            boot.stop()
        home.stop()


def test_instance_enrolled_and_checked_in(deployed, boot_image):
    row = deployed["instance"]
    assert row["image_id"] == boot_image.image_id
    assert row["machine"]["fingerprint"] == deployed["boot"].fingerprint
    assert row["last_seen"] is not None and row["agent_version"]
    timings = deployed["boot"].timings
    print(f"qemu start -> enrolled {timings['enrolled_s']} s, "
          f"-> first check-in {timings['checked_in_s']} s")


def test_dhcp_address_from_qemu(deployed):
    """Seen from qemu's side: the agent's sockets to home come from the DHCP lease."""
    assert deployed["sources"] == {vm.GUEST_DHCP_ADDRESS}


def test_selfcheck_reports_the_ovf_hardware(deployed):
    check = deployed["instance"]["selfcheck"]
    m = check["measured"]
    assert check["platform"] == machine.QEMU
    assert m["vcpu"] == 4
    assert 7.5 * GiB <= m["ram_bytes"] <= 8 * GiB
    assert 15.9 * GiB <= m["disk_bytes"] <= 16 * GiB
    assert 3.9 * GiB <= m["swap_bytes"] <= 4 * GiB
    short = [s for s in check["shortfalls"] if s["check"] in RESOURCE_CHECKS]
    assert short == [], f"resource shortfalls: {short}"


def test_agent_reports_no_listening_socket(deployed):
    assert deployed["instance"]["listening"] == []


def test_no_login_prompt_on_the_console(deployed):
    text = deployed["boot"].console()
    assert "tether first boot: settings from ovf-iso" in text, "first-boot service did not run"
    found = bootrun.LOGIN_PROMPT.search(text)
    assert found is None, f"a login prompt on the serial console: {text[found.start()-80:found.end()]!r}"


def test_nothing_listens_on_port_22(deployed):
    probe = deployed["probe"]
    assert probe.state != "open", f"guest port 22 answered: {probe.banner!r}"


def test_second_machine_is_refused_as_a_clone(deployed, boot_image, accelerator, boot_timeout):
    """Same image, another machine UUID: max-instances 1 (an OVA) refuses it."""
    home = deployed["home"]
    deployed["boot"].stop()  # one VM at a time
    connector = home.connector_row(home.connector)
    assert connector["max_instances"] == 1, "the image's connector must allow one instance (OVA)"
    clone = bootrun.start(boot_image, home, deployed["tmp"] / "vm2", {"home.url": bootrun.HOME_URL},
                          accelerator)
    try:
        refused = clone.wait_clone_refused(boot_timeout)
    finally:
        clone.stop()
    bootrun.TIMINGS.append(("clone", clone.timings))
    assert refused["image"] == boot_image.image_id
    status = home.status()
    assert [i["instance_id"] for i in status["instances"]
            if i["image_id"] == boot_image.image_id] == [deployed["instance"]["instance_id"]]
    assert any(c["machine_fingerprint"] == clone.fingerprint for c in status["clones"])


def test_static_address_from_the_iso_transport(boot_image, accelerator, boot_timeout,
                                                tmp_path_factory):
    """ovf-env.xml with a static address, DNS, home URL and one bad value."""
    tmp = tmp_path_factory.mktemp("static")
    home = start_home(boot_image.home_state, tmp, boot_image.image_id, vm.GUEST_HOME_ADDRESS)
    props = {"network.mode": "static", "network.address": STATIC["address"],
             "network.prefix": STATIC["prefix"], "network.gateway": STATIC["gateway"],
             "network.dns": STATIC["dns"], "proxy.url": BAD_PROXY, "home.url": bootrun.HOME_URL}
    boot = None
    try:
        boot = bootrun.start(boot_image, home, tmp / "vm", props, accelerator)
        enrolled = boot.wait_enrolled(boot_timeout)
        boot.wait_checked_in(enrolled["instance"], boot_timeout)
        row = _wait_selfcheck(boot, enrolled["instance"], 120)
        sources = bootrun.home_connection_sources(boot)
        console = boot.console()
    finally:
        if boot is not None:
            boot.stop()
        home.stop()
    bootrun.TIMINGS.append(("static address boot", boot.timings))
    assert f"network static {STATIC['address']}/{STATIC['prefix']}" in console
    assert f"ignored proxy={BAD_PROXY!r}" in console
    assert sources == {STATIC["address"]}, f"agent's sockets to home come from {sources}"
    reported = json.dumps(row)
    assert STATIC["address"] in reported, (
        "home does not show the static address: the agent must report its interface "
        f"addresses in its hello/self-check (instance row: {reported[:600]})")
    assert BAD_PROXY in reported, (
        "home does not show the rejected first-boot value: the agent must report "
        "firstboot.json's 'rejected' list home once connected")
