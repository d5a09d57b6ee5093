"""The qemu launcher's command line and helpers (no VM is booted here)."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from tether.agent import firstboot

import vm

UUID = "0b7c6a52-3f0e-4c8e-9d55-6f1d2a3b4c5d"


def _cfg(tmp_path: Path, **kw) -> vm.VmConfig:
    disk = tmp_path / "d.raw"
    disk.write_bytes(b"\0" * 512)
    return vm.VmConfig(disk=disk, workdir=tmp_path / "run", **kw)


def _opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_command_has_the_ovf_hardware(tmp_path):
    argv = vm.command(_cfg(tmp_path), UUID)
    assert _opt(argv, "-smp") == ["4"] and _opt(argv, "-m") == ["8192"]
    assert _opt(argv, "-uuid") == [UUID]
    devices = _opt(argv, "-device")
    assert any(d.startswith("nvme,drive=d0,") and "bootindex=0" in d for d in devices)
    assert any(d.startswith("vmxnet3,netdev=n0") for d in devices)
    assert _opt(argv, "-machine") == ["pc,accel=tcg"]
    assert _opt(argv, "-serial") == [f"file:{tmp_path / 'run' / 'console.log'}"]


def test_netdev_is_restricted_with_guestfwd_and_loopback_hostfwd(tmp_path):
    net = vm.netdev_arg(_cfg(tmp_path, home_port=4443, ssh_probe_port=2222))
    parts = net.split(",")
    assert "restrict=on" in parts
    assert "guestfwd=tcp:10.0.2.100:443-cmd:socat STDIO TCP:127.0.0.1:4443" in parts
    assert "hostfwd=tcp:127.0.0.1:2222-:22" in parts


def test_netdev_without_home_has_no_forward(tmp_path):
    assert "guestfwd" not in vm.netdev_arg(_cfg(tmp_path))


def test_overrides_iso_and_snapshot(tmp_path):
    iso = tmp_path / "env.iso"
    iso.write_bytes(b"x")
    argv = vm.command(_cfg(tmp_path, cpus=2, memory_mib=2048, iso=iso, snapshot=True,
                           accelerator="kvm"), UUID)
    assert _opt(argv, "-smp") == ["2"] and _opt(argv, "-m") == ["2048"]
    drives = _opt(argv, "-drive")
    assert any("snapshot=on" in d for d in drives)
    assert f"if=ide,index=1,media=cdrom,readonly=on,file={iso}" in drives
    assert _opt(argv, "-cpu") == ["host"]


def test_clone_gets_its_own_mac():
    assert vm.mac_for(UUID) != vm.mac_for("11111111-2222-3333-4444-555555555555")
    assert vm.mac_for(UUID).startswith("52:54:00:")


@pytest.mark.parametrize("change, words", [
    ({"uuid": "not-a-uuid"}, "is not a UUID"),
    ({"cpus": 0}, "at least 1 vCPU"),
    ({"accelerator": "hvf"}, "use tcg or kvm"),
    ({"home_port": 70000}, "not in 1..65535"),
])
def test_bad_config_is_refused_clearly(tmp_path, change, words):
    with pytest.raises(vm.VmError, match=words):
        vm.check_config(_cfg(tmp_path, **change))


def test_missing_disk_says_how_to_build(tmp_path):
    with pytest.raises(vm.VmError, match="make image"):
        vm.check_config(vm.VmConfig(disk=tmp_path / "nope.raw", workdir=tmp_path))


def test_ovf_environment_round_trips_through_the_agent_parser():
    props = {"network.mode": "static", "network.address": "10.0.2.50", "home.url": "wss://x/&<"}
    doc = vm.ovf_environment(props)
    assert firstboot.parse_ovf_environment(doc) == props
    ET.fromstring(doc)


def test_transport_iso_carries_ovf_env(tmp_path):
    iso = vm.make_transport_iso(vm.ovf_environment({"hostname": "a1"}), tmp_path / "env.iso")
    out = subprocess.run(["xorriso", "-indev", str(iso), "-ls", "/"], capture_output=True,
                         text=True, check=True)
    assert "ovf-env.xml" in out.stdout
    assert vm.OVF_ISO_LABEL in out.stderr + out.stdout


def test_probe_sees_closed_and_open_ports():
    import socket
    import threading

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        def banner():
            conn, _ = server.accept()
            conn.sendall(b"SSH-2.0-test\r\n")
            conn.close()

        t = threading.Thread(target=banner)
        t.start()
        assert vm.probe_forwarded_port(port, wait=5).state == "open"
        t.join()
    assert vm.probe_forwarded_port(vm.free_port(), wait=2).state == "closed"


def test_guest_sources_from_info_usernet():
    usernet = (
        "Hub -1 (n0):\n"
        "  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\n"
        "  TCP[HOST_FORWARD]  12       127.0.0.1 52335       10.0.2.15    22     0     0\n"
        "  TCP[ESTABLISHED]   15       10.0.2.50 43210      10.0.2.100   443     0     0\n"
        "  TCP[ESTABLISHED]   16       10.0.2.50 43212      10.0.2.100   443     0     0\n"
        "  UDP[236 sec]       17       10.0.2.50   123        10.0.2.2   123     0     0\n")
    assert vm.guest_sources(usernet, "10.0.2.100", 443) == {"10.0.2.50"}


def test_monitor_answers_info_usernet(tmp_path):
    """A real qemu (no guest code runs: no disk boots in 0 s) answers on its monitor."""
    cfg = _cfg(tmp_path, home_port=vm.free_port(), cpus=1, memory_mib=256)
    with vm.Vm(cfg) as machine:
        machine.wait_for(cfg.monitor_socket.exists, 30, "the monitor socket")
        text = machine.usernet()
    assert "Protocol[State]" in text and "HOST_FORWARD" not in text
    assert not machine.running()
