"""The shipped systemd unit: what the contract says it runs, and how hardened it is."""

import re
import shutil
import subprocess
from importlib import resources

import pytest

UNIT = resources.files("tether.agent") / "tether-agent.service"
FIRSTBOOT_UNIT = resources.files("tether.agent") / "tether-firstboot.service"


def directives(unit=UNIT) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def test_unit_runs_the_contract_command_as_notify_service():
    d = directives()
    assert d["ExecStart"] == [
        "/opt/tether/venv/bin/tether-agent run --etc /etc/tether --state /var/lib/tether"]
    assert d["Type"] == ["notify"] and d["WatchdogSec"] and d["User"] == ["tether"]
    assert d["StateDirectory"] == ["tether"] and d["StateDirectoryMode"] == ["0700"]
    assert d["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert d["CapabilityBoundingSet"] == [""] and d["NoNewPrivileges"] == ["yes"]
    assert d["ProtectSystem"] == ["strict"]
    assert any(v.startswith("@system-service") for v in d["SystemCallFilter"])
    assert "LoadCredential" not in d  # fails the unit on a guest without a DMI UUID
    # tether-firstboot (ordered before) exports the machine UUID: no second Python
    # start at every boot, slow under emulation.
    assert not [v for v in d.get("ExecStartPre", []) if "python" in v]
    assert "tether-firstboot.service" in d["After"][0].split()
    assert d["RuntimeDirectory"] == ["tether-agent"]


def test_firstboot_runs_early_but_after_what_it_needs():
    """No default dependencies (it overlaps /data's check and resolved's start), yet
    ordered after networkd, udev's coldplug trigger and the early module loading (the
    CD-ROM drivers), and before the network is called online and before the agent;
    stopped at shutdown. It must not wait for the local file systems (/data)."""
    d = directives(FIRSTBOOT_UNIT)
    after = " ".join(d["After"]).split()
    before = " ".join(d["Before"]).split()
    assert d["DefaultDependencies"] == ["no"]
    assert {"systemd-networkd.service", "systemd-udev-trigger.service",
            "systemd-modules-load.service"} <= set(after)
    assert "local-fs.target" not in after
    assert {"network-online.target", "tether-agent.service", "shutdown.target"} <= set(before)
    assert d["Conflicts"] == ["shutdown.target"]
    assert "PrivateTmp" not in d  # would order it after systemd-tmpfiles-setup.service


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze missing")
def test_security_exposure_at_most_2():
    out = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(UNIT)],
                         capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout + out.stderr)
    assert match, out.stdout + out.stderr
    assert float(match.group(1)) <= 2.0
