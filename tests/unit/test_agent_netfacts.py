"""The network section of the self-check: addresses and refused first-boot values."""

from __future__ import annotations

import json

from tether.agent import netfacts


def test_loopback_is_not_reported_and_prefixes_are_numbers():
    addresses = netfacts.interface_addresses()
    assert all(not a["address"].startswith("127.") and a["address"] != "::1" for a in addresses)
    assert all(a["prefix"] is None or 0 <= a["prefix"] <= 128 for a in addresses)


def test_prefix_from_netmask():
    assert netfacts._prefix("255.255.255.0", 4) == 24
    assert netfacts._prefix("ffff:ffff:ffff:ffff::", 6) == 64
    assert netfacts._prefix("not a mask", 4) is None


def test_firstboot_rejected_values_are_carried(tmp_path):
    path = tmp_path / "firstboot.json"
    path.write_text(json.dumps({
        "source": "ovf-iso", "network": {"mode": "dhcp"},
        "rejected": [{"key": "proxy.url", "value": "proxy.example:3128",
                      "reason": "needs a scheme"}]}))
    summary = netfacts.describe(path)["firstboot"]
    assert summary["source"] == "ovf-iso" and summary["mode"] == "dhcp"
    assert summary["rejected"][0]["value"] == "proxy.example:3128"


def test_missing_or_broken_firstboot_file(tmp_path):
    assert netfacts.firstboot_summary(tmp_path / "absent.json") is None
    assert netfacts.firstboot_summary(None) is None
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "unreadable" in netfacts.firstboot_summary(bad)["error"]


def test_no_netlink_in_the_sandbox_still_reports(monkeypatch):
    """The unit forbids AF_NETLINK: psutil fails, the socket's own address still goes home."""
    def refused():
        raise PermissionError(97, "Address family not supported by protocol")
    monkeypatch.setattr(netfacts.psutil, "net_if_addrs", refused)
    facts = netfacts.describe(None, "10.0.2.50")
    assert facts["addresses"] == []
    assert facts["local_address"] == "10.0.2.50"
