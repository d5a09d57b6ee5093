"""The agent as a service: sd_notify (READY, STATUS, WATCHDOG, STOPPING) over a real
datagram socket, clean stop on SIGTERM, and ``tether-agent selfcheck`` against a
real home (DNS, reachability, clock skew from home's Date header).
"""

from __future__ import annotations

import json
import socket
import subprocess

import pytest

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def test_notify_ready_watchdog_and_stopping(home_factory, agent_factory, tmp_path):
    home = home_factory()
    path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.settimeout(20)
    try:
        agent = agent_factory(home.issue_image(),
                              env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"})
        seen: list[str] = []
        while not any("WATCHDOG=1" in m for m in seen) or \
                not any("sockets to home" in m for m in seen):
            seen.append(receiver.recv(4096).decode())
        assert seen[0].startswith("READY=1")  # ready before home answers: works offline too
        assert any("STATUS=2/2 sockets to home" in m for m in seen)
        assert agent.stop() == 0
        while "STOPPING=1" not in seen[-1]:
            seen.append(receiver.recv(4096).decode())
    finally:
        receiver.close()
    assert "agent stopped" in agent.log()


def test_selfcheck_command_reaches_home(home_factory, tmp_path, credential_installer,
                                       agent_command):
    home = home_factory()
    bundle = home.issue_image()
    etc = credential_installer(bundle["path"], tmp_path / "etc")
    result = subprocess.run([str(agent_command), "selfcheck", "--json", "--etc", str(etc),
                             "--state", str(tmp_path / "state"),
                             "--firstboot", str(tmp_path / "none.json")],
                            capture_output=True, text=True, timeout=60)
    report = json.loads(result.stdout)
    probe = report["measured"]["home"]
    assert probe["dns_ok"] is True and probe["reachable"] is True, probe
    assert probe["addresses"] == ["127.0.0.1"]
    assert abs(probe["clock_skew_s"]) < 2.0  # same host: only Date's 1 s resolution
    assert result.returncode == (0 if report["verdict"] == "ok" else 1)
    assert "home_reachable" not in {s["check"] for s in report["shortfalls"]}


def test_selfcheck_command_reports_unreachable_home(home_factory, tmp_path, unused_port,
                                                   credential_installer, agent_command):
    home = home_factory()
    dead = f"wss://127.0.0.1:{unused_port()}/"
    etc = credential_installer(home.issue_image()["path"], tmp_path / "etc", [dead])
    result = subprocess.run([str(agent_command), "selfcheck", "--etc", str(etc),
                             "--state", str(tmp_path / "state"),
                             "--firstboot", str(tmp_path / "none.json")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "verdict: degraded" in result.stdout
    assert "SHORT home_reachable" in result.stdout and "outbound 443" in result.stdout
