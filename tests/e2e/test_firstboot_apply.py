"""The first-boot service's steps, on temporary directories (no VM, no root needed).

The full path (CD mounted by the service, networkd applying the file, the
agent reporting the static address home) is in test_boot.py.
"""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

from tether.agent import firstboot, machine
from tether.agent import firstboot_apply as fa

import vm


def _settings(**raw) -> firstboot.FirstBootSettings:
    return firstboot.normalize(raw, "ovf-iso")


def test_static_unit_on_the_primary_nic():
    s = _settings(mode="static", address="10.0.2.50", prefix="24", gateway="10.0.2.2",
                  dns="10.0.2.3, 192.0.2.53", ntp="ntp1.example")
    text = fa.network_unit(s, "ens3")
    assert "Name=ens3" in text
    assert "Address=10.0.2.50/24" in text and "Gateway=10.0.2.2" in text
    assert "DNS=10.0.2.3" in text and "DNS=192.0.2.53" in text
    assert "NTP=ntp1.example" in text and "DHCP=yes" not in text
    # no wait for an IPv6 router advertisement before the link counts as configured
    assert "IPv6AcceptRA=no" in text
    assert "IPv6AcceptRA" not in fa.network_unit(_settings(dns="192.0.2.53"), "ens3")


def test_dhcp_with_dns_overrides_the_lease():
    text = fa.network_unit(_settings(dns="192.0.2.53", hostname="conn-1"), "ens3")
    assert "DHCP=yes" in text and "Name=en* eth*" in text
    assert "[DHCPv4]" in text and "UseDNS=no" in text and "UseHostname=no" in text


def test_nothing_to_write_when_the_image_default_fits():
    assert fa.network_unit(_settings(home_urls="wss://h/"), "ens3") is None


def test_bad_static_falls_back_to_dhcp_unit():
    s = _settings(mode="static", address="10.0.2.500", prefix="40", dns="10.0.2.3")
    text = fa.network_unit(s, "ens3")
    assert "DHCP=yes" in text and "Address=" not in text
    assert {r.key for r in s.rejected} >= {"address"}


def test_ipv6_static():
    text = fa.network_unit(_settings(mode="static", address="2001:db8::5", prefix="64",
                                     gateway="2001:db8::1"), "ens3")
    assert "Address=2001:db8::5/64" in text and "IPv6AcceptRA=no" in text


def test_unit_file_sorts_before_the_image_default():
    assert fa.UNIT_NAME < "80-dhcp.network"


def test_write_network_unit_changes_and_removes(tmp_path):
    assert fa.write_network_unit("[Match]\n", tmp_path)
    assert not fa.write_network_unit("[Match]\n", tmp_path)
    assert (tmp_path / fa.UNIT_NAME).stat().st_mode & 0o777 == 0o644
    assert fa.write_network_unit(None, tmp_path)
    assert not (tmp_path / fa.UNIT_NAME).exists()


def test_settings_json_is_world_readable_and_agent_shaped(tmp_path):
    s = _settings(home_urls="wss://10.0.2.100:443/", proxy="nope")
    path = fa.write_settings(s, tmp_path / "run")
    doc = json.loads(path.read_text())
    assert doc["home_urls"] == ["wss://10.0.2.100:443/"] and "proxy" not in doc
    assert doc["rejected"][0]["key"] == "proxy"
    assert path.stat().st_mode & 0o777 == 0o644


def test_sources_per_platform():
    names = lambda p: [s.name for s in fa.sources_for(p)]
    assert names(machine.VMWARE) == ["ovf-guestinfo", "ovf-iso"]
    assert names(machine.QEMU) == ["ovf-iso"]
    assert names(machine.AWS) == ["ovf-iso", "ec2"]


def test_primary_nic_is_the_first_physical_ethernet(tmp_path):
    for name, kind, device in (("lo", "772", False), ("ens4", "1", True), ("ens3", "1", True),
                               ("docker0", "1", False)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "type").write_text(kind + "\n")
        if device:
            (tmp_path / name / "device").mkdir()
    assert fa.primary_nic(tmp_path) == "ens3"


def test_default_route_detection(tmp_path):
    route = tmp_path / "route"
    route.write_text("Iface\tDestination\tGateway\nens3\t0002000A\t00000000\n")
    assert not fa.has_default_route(route)
    route.write_text("Iface\tDestination\tGateway\nens3\t00000000\t0202000A\n")
    assert fa.has_default_route(route)


def test_hostname_applied_only_when_given():
    seen = []
    assert fa.apply_hostname("conn-1", seen.append) and seen == ["conn-1"]
    assert not fa.apply_hostname(None, seen.append)


def test_reload_reports_failures(tmp_path):
    bus = tmp_path / "system_bus_socket"
    bus.touch()

    def run(argv, **kw):
        return subprocess.CompletedProcess(argv, 1 if argv[1] == "reconfigure" else 0, "", "no such link")
    problems = fa.reload_networkd("ens9", run, bus=bus)
    assert problems == ["networkctl reconfigure ens9 failed: no such link"]


def test_reload_waits_for_the_system_bus(tmp_path):
    """Before sysinit.target D-Bus does not listen yet: networkctl would fail at once."""
    bus = tmp_path / "system_bus_socket"
    calls = []

    def run(argv, **kw):
        calls.append((argv[1], bus.exists()))
        return subprocess.CompletedProcess(argv, 0, "", "")

    threading.Timer(0.3, bus.touch).start()
    assert fa.reload_networkd("ens9", run, bus=bus, bus_wait=10) == []
    assert calls == [("reload", True), ("reconfigure", True)]


def test_reload_without_a_bus_says_so(tmp_path):
    def run(argv, **kw):
        return subprocess.CompletedProcess(argv, 1, "", "Failed to connect system bus")
    problems = fa.reload_networkd("ens9", run, bus=tmp_path / "absent", bus_wait=0)
    assert problems[0].startswith("no system bus at")


def test_mount_transport_keeps_only_a_cd_with_ovf_env(tmp_path):
    """mount is simulated: the second 'CD' carries ovf-env.xml."""
    mounts = []

    def run(argv, **kw):
        if argv[0] == "mount":
            mounts.append(argv[-2])
            if argv[-2] == "/dev/sr1":
                (Path(argv[-1]) / "ovf-env.xml").write_text(vm.ovf_environment({"hostname": "x"}))
            return subprocess.CompletedProcess(argv, 0)
        return subprocess.CompletedProcess(argv, 0)

    found = fa.mount_transport(tmp_path, [Path("/dev/sr0"), Path("/dev/sr1")], run)
    assert found == Path("/dev/sr1") and mounts == ["/dev/sr0", "/dev/sr1"]


def _recording_run(calls):
    def run(argv, **kw):
        calls.append(argv[0])
        return subprocess.CompletedProcess(argv, 1)  # nothing mounts: no CD carries a document
    return run


def test_mount_transport_does_not_wait_for_udev_when_a_cd_is_there(tmp_path):
    """The CD-ROM drivers load from modules-load.d: an sr node present means no settle."""
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "sr0").touch()
    calls = []
    assert fa.mount_transport(tmp_path / "mnt", run=_recording_run(calls), dev_dir=dev) is None
    assert calls == ["mount"]


def test_mount_transport_waits_for_udev_only_without_a_cd(tmp_path):
    dev = tmp_path / "dev"
    dev.mkdir()
    calls = []
    assert fa.mount_transport(tmp_path / "mnt", run=_recording_run(calls), dev_dir=dev) is None
    assert calls == ["udevadm"]


def test_main_reads_an_iso_document_and_writes_everything(tmp_path, monkeypatch, capsys):
    mount = tmp_path / "ovfenv"
    mount.mkdir()
    (mount / "ovf-env.xml").write_text(vm.ovf_environment({
        "network.mode": "static", "network.address": "10.0.2.50", "network.prefix": "40",
        "home.url": "wss://10.0.2.100:443/"}))
    monkeypatch.setattr(fa.machine, "detect_platform", lambda: machine.QEMU)
    code = fa.main(["--run-dir", str(tmp_path / "run"), "--network-dir", str(tmp_path / "net"),
                    "--mount-point", str(mount), "--no-mount", "--no-apply"])
    assert code == 0
    doc = json.loads((tmp_path / "run" / "firstboot.json").read_text())
    assert doc["source"] == "ovf-iso" and doc["network"]["mode"] == "dhcp"
    out = capsys.readouterr().out
    assert "settings from ovf-iso" in out and "ignored prefix='40'" in out


def _ip_json(*addresses):
    info = [{"family": "inet6" if ":" in a else "inet", "local": a, "scope": "global"} for a in addresses]
    info.append({"family": "inet6", "local": "fe80::1", "scope": "link"})
    return json.dumps([{"ifname": "ens3", "addr_info": info}])


def test_static_address_waits_until_the_dhcp_address_is_gone():
    """networkd drops the DHCP lease on reconfigure, its address a moment later."""
    outputs = [_ip_json("10.0.2.15", "10.0.2.50"), _ip_json("10.0.2.50")]
    calls = []

    def run(argv, **kw):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, outputs[min(len(calls), len(outputs)) - 1], "")

    assert fa.wait_for_static_address("ens3", "10.0.2.50", run=run, sleep=lambda _: None) is None
    assert len(calls) == 2 and calls[0][:3] == ["ip", "-json", "address"]


def test_static_address_that_never_settles_is_a_problem():
    def run(argv, **kw):
        return subprocess.CompletedProcess(argv, 0, _ip_json("10.0.2.15", "10.0.2.50"), "")

    problem = fa.wait_for_static_address("ens3", "10.0.2.50", timeout=0, run=run, sleep=lambda _: None)
    assert problem and "10.0.2.15" in problem and "10.0.2.50" in problem


def test_static_ipv6_ignores_ipv4_and_link_local():
    def run(argv, **kw):
        return subprocess.CompletedProcess(argv, 0, _ip_json("10.0.2.15", "2001:db8::5"), "")

    assert fa.wait_for_static_address("ens3", "2001:db8::5", timeout=0, run=run) is None
