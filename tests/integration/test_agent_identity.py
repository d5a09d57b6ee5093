"""Real ``tether-agent run`` against a real ``tether-home serve`` over TLS on loopback:
first-boot enrollment, check-in with self-check figures, clone refusal.
"""

from __future__ import annotations

import os
import stat

import psutil
import pytest

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


def instance_of(home, agent_fingerprint):
    for row in home.status()["instances"]:
        machine = row.get("machine") or {}
        if machine.get("fingerprint") == agent_fingerprint:
            return row
    return None


def test_first_boot_enrolls_and_checks_in(home_factory, agent_factory, waiter):
    home = home_factory(max_instances=1)
    agent = agent_factory(home.issue_image())
    agent.wait_log("enrolled as instance")
    agent.wait_log("socket 1 connected")

    # keys made on first boot, private, the certificate from home's CA
    for name in ("instance.key", "sealing.key"):
        assert stat.S_IMODE((agent.state / name).stat().st_mode) == 0o600
    assert (agent.state / "instance.crt").exists()

    row = waiter(lambda: (r := instance_of(home, agent.fingerprint))
                 and r["connected_sockets"] == 2 and r, 30, what="2 sockets in status")
    check = row["selfcheck"]
    assert check["verdict"] in ("ok", "degraded")
    assert check["measured"]["vcpu"] == psutil.cpu_count()
    assert check["measured"]["ram_bytes"] == psutil.virtual_memory().total
    assert check["platform"] == "qemu-kvm"  # from the fake DMI directory
    if psutil.cpu_count() < 4:
        assert any(s["check"] == "vcpu" for s in check["shortfalls"])
    assert row["listening"] == []  # the agent has no listening socket
    # and psutil agrees from the outside
    conns = psutil.Process(agent.pid).net_connections(kind="inet")
    assert not [c for c in conns if c.status == psutil.CONN_LISTEN]
    assert all(c.raddr for c in conns)

    # a restart reuses the identity: no second enrollment, same instance
    agent.stop()
    first_id = row["instance_id"]
    agent.start()
    agent.wait_log("socket 0 connected", count=2)
    assert agent.log().count("enrolled as instance") == 1
    row = waiter(lambda: instance_of(home, agent.fingerprint), 10)
    assert row["instance_id"] == first_id
    assert len(home.status()["instances"]) == 1


def test_clone_on_second_machine_is_refused(home_factory, agent_factory, waiter):
    home = home_factory(max_instances=1)
    bundle = home.issue_image()
    original = agent_factory(bundle, name="original")
    original.wait_log("enrolled as instance")
    clone = agent_factory(bundle, name="clone")  # same image, another machine UUID
    text = clone.wait_log("enrollment failed")
    assert "clone_refused" in text
    assert clone.alive()  # refused, not crashed: it keeps trying with backoff
    assert not (clone.state / "instance.crt").exists()
    status = waiter(lambda: (s := home.status())["clones"] and s, 15, what="clone flagged")
    flagged = json_text = str(status["clones"])
    assert clone.fingerprint in flagged, json_text
    assert len(status["instances"]) == 1
    assert os.path.exists(original.state / "instance.crt")


def test_network_facts_and_refused_firstboot_values_reach_home(home_factory, agent_factory,
                                                                 waiter):
    """An operator learns from home what the first-boot service refused (issue 4)."""
    home = home_factory(max_instances=1)
    firstboot = {"source": "ovf-iso", "network": {"mode": "dhcp"},
                 "rejected": [{"key": "proxy.url", "value": "proxy.example:3128",
                               "reason": "a proxy URL needs a scheme (http://)"}]}
    agent = agent_factory(home.issue_image(), firstboot=firstboot)
    agent.wait_log("socket 1 connected")
    row = waiter(lambda: (r := instance_of(home, agent.fingerprint)) and r["selfcheck"] and r,
                 30, what="self-check in status")
    network = row["selfcheck"]["network"]
    assert network["firstboot"]["source"] == "ovf-iso"
    assert network["firstboot"]["rejected"][0]["value"] == "proxy.example:3128"
    host_addresses = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values()
                      for a in addrs}
    assert all(a["address"] in host_addresses for a in network["addresses"])
    assert network["local_address"] == "127.0.0.1"  # our end of the socket to home
