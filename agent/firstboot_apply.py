"""The first-boot settings service: platform settings -> network, hostname, home.

Runs at every boot as ``tether-firstboot.service`` (root, oneshot), after
systemd-networkd has started and before ``network-online.target`` and the
agent. Settings can change between boots (an operator edits the vApp
properties and restarts the VM), and everything it writes lives in /run, so
every boot starts from the image's defaults (DHCP, 80-dhcp.network).

Steps, each small and separately tested:

0. export the root-only DMI product UUID to ``/run/tether/machine-uuid`` for the
   unprivileged agent's machine fingerprint (see :mod:`tether.agent.machine`;
   done here rather than in a Python ``ExecStartPre`` of the agent unit, which
   would start one more interpreter at every boot);
1. mount the OVF ISO transport CD read-only, if a CD carries ``ovf-env.xml``;
2. :func:`tether.agent.firstboot.detect` over the sources this platform
   offers (VMware Tools only on VMware, EC2 user data only on AWS, so other
   platforms never wait for a metadata service that is not there);
3. write ``/run/tether/firstboot.json`` (the agent's overrides and the
   rejected values it reports home);
4. set the hostname and write a systemd-networkd ``.network`` file to
   ``/run/systemd/network`` that sorts before the image's DHCP file, then
   have networkd reload and reconfigure;
5. print one status line and every rejected value to the console.

A failure in one step is printed and the others still run: the appliance
must come up on DHCP with a message rather than not at all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from tether.atomicfile import write_atomic

from . import firstboot, machine

RUN_DIR = machine.FIRSTBOOT_RUN_DIR  # /run/tether, where the agent looks
NETWORK_DIR = Path("/run/systemd/network")
#: Sorts before the image's /etc/systemd/network/80-dhcp.network, so it wins.
UNIT_NAME = "10-tether-firstboot.network"
SYS_CLASS_NET = Path("/sys/class/net")
MOUNT_POINT = RUN_DIR / "ovfenv"
UDEV_SETTLE_TIMEOUT = 15
ROUTE_WAIT = 30.0
STATIC_WAIT = 15.0
#: networkctl talks to networkd over D-Bus; the bus socket comes with sockets.target.
SYSTEM_BUS = Path("/run/dbus/system_bus_socket")
BUS_WAIT = 60.0


def say(line: str) -> None:
    """The unit sends stdout to the console and the journal."""
    print(line, flush=True)


# ------------------------------------------------------------ ISO transport


def cdrom_devices(dev: Path = Path("/dev")) -> list[Path]:
    """CD-ROM block devices (sr0, sr1, ...) in order."""
    return sorted(dev.glob("sr[0-9]*"), key=lambda p: int(p.name[2:] or 0))


def mount_transport(mount_point: Path = MOUNT_POINT, devices: Iterable[Path] | None = None,
                    run=subprocess.run, dev_dir: Path = Path("/dev")) -> Path | None:
    """Mount the first CD that carries an OVF environment; the device, or None.

    The image loads the CD-ROM drivers (ata_piix, sr_mod) at boot from
    /etc/modules-load.d, so a CD attached at power-on is normally in /dev by
    now. Only when none is there does it wait for udev to finish coldplug
    (``udevadm settle``: seconds under TCG) and look again, in case the
    drivers came some other way.
    """
    if devices is None:
        devices = cdrom_devices(dev_dir)
        if not devices:
            run(["udevadm", "settle", f"--timeout={UDEV_SETTLE_TIMEOUT}"], check=False,
                capture_output=True)
            devices = cdrom_devices(dev_dir)
    mount_point.mkdir(parents=True, exist_ok=True)
    for device in devices:
        res = run(["mount", "-t", "iso9660", "-o", "ro,nodev,nosuid,noexec", str(device),
                   str(mount_point)], check=False, capture_output=True, text=True)
        if res.returncode != 0:
            continue  # empty drive or not an ISO 9660 medium
        if any((mount_point / name).is_file() for name in firstboot.OvfIsoSource.FILE_NAMES):
            return device
        unmount(mount_point, run)
    return None


def unmount(mount_point: Path = MOUNT_POINT, run=subprocess.run) -> None:
    run(["umount", str(mount_point)], check=False, capture_output=True)


# ------------------------------------------------------------ sources


def sources_for(platform: str, mount_point: Path = MOUNT_POINT) -> list[firstboot.DataSource]:
    """The sources worth asking on this platform, in firstboot's order."""
    sources: list[firstboot.DataSource] = []
    if platform == machine.VMWARE:
        sources.append(firstboot.OvfGuestInfoSource())
    sources.append(firstboot.OvfIsoSource([mount_point]))
    if platform == machine.AWS:
        sources.append(firstboot.Ec2UserDataSource())
    return sources


def has_default_route(route_file: Path = Path("/proc/net/route")) -> bool:
    """True once DHCP (or a static config) installed an IPv4 default route."""
    try:
        lines = route_file.read_text().splitlines()[1:]
    except OSError:
        return False
    return any(len(f) > 2 and f[1] == "00000000" for f in (line.split() for line in lines))


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.2,
               sleep=time.sleep) -> bool:
    """Poll `condition` (at least once) until it holds; False after `timeout` seconds.

    The one bounded wait of this service: for the route, D-Bus, the static address.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        sleep(interval)
    return True


def wait_for_route(timeout: float = ROUTE_WAIT) -> bool:
    """EC2 user data needs the network DHCP brings up; wait for it, bounded."""
    return wait_until(has_default_route, timeout)


# ------------------------------------------------------------ network


def primary_nic(sys_class_net: Path = SYS_CLASS_NET) -> str | None:
    """The first physical Ethernet interface (a static address belongs on one NIC only)."""
    names = []
    for entry in sorted(sys_class_net.iterdir()) if sys_class_net.is_dir() else []:
        try:
            is_ether = (entry / "type").read_text().strip() == "1"
        except OSError:
            continue
        if is_ether and (entry / "device").exists():
            names.append(entry.name)
    return names[0] if names else None


def network_unit(settings: firstboot.FirstBootSettings, nic: str | None) -> str | None:
    """The .network file text for these settings; None when the image default fits."""
    if settings.mode != "static" and not (settings.dns or settings.ntp or settings.hostname):
        return None
    lines = [(f"# written by tether-firstboot at boot from {settings.source}; "
              "/run is cleared at every boot"),
             "[Match]",
             f"Name={nic}" if settings.mode == "static" and nic else "Name=en* eth*",
             "", "[Network]"]
    if settings.mode == "static":
        lines.append(f"Address={settings.address}/{settings.prefix}")
        if settings.gateway:
            lines.append(f"Gateway={settings.gateway}")
        # Static means static: without this networkd waits for an IPv6 router
        # advertisement before it calls the link configured, and the agent
        # (after network-online) started 12 s later on a network without one.
        lines.append("IPv6AcceptRA=no")
    else:
        lines.append("DHCP=yes")
    lines += [f"DNS={d}" for d in settings.dns]
    if settings.ntp:
        lines.append("NTP=" + " ".join(settings.ntp))
    if settings.mode != "static":
        # Values the operator set win over what the DHCP server offers.
        dhcp = [opt for opt, given in (("UseDNS=no", settings.dns), ("UseNTP=no", settings.ntp),
                                       ("UseHostname=no", settings.hostname)) if given]
        if dhcp:
            lines += ["", "[DHCPv4]", *dhcp]
    return "\n".join(lines) + "\n"


def write_network_unit(text: str | None, directory: Path = NETWORK_DIR) -> bool:
    """Write (or remove) our .network file; True when it changed."""
    path = directory / UNIT_NAME
    old = path.read_text() if path.is_file() else None
    if text == old:
        return False
    if text is None:
        path.unlink()
    else:
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text, 0o644)
    return True


def reload_networkd(nic: str | None, run=subprocess.run, bus: Path = SYSTEM_BUS,
                    bus_wait: float = BUS_WAIT) -> list[str]:
    """networkctl reload + reconfigure; the problems, if any (empty list: fine).

    This service runs before sysinit.target, so D-Bus may not listen yet: wait
    for its socket (it comes with sockets.target) instead of failing with
    "Failed to connect system bus". Only a changed .network file gets here.
    """
    problems = []
    if not wait_until(bus.exists, bus_wait, interval=0.1):
        problems.append(f"no system bus at {bus} after {bus_wait:.0f} s")
    for argv in (["networkctl", "reload"],
                 ["networkctl", "reconfigure", nic] if nic else None):
        if argv is None:
            continue
        res = run(argv, check=False, capture_output=True, text=True)
        if res.returncode != 0:
            problems.append(f"{' '.join(argv)} failed: {(res.stderr or res.stdout).strip()}")
    return problems


def nic_addresses(nic: str, run=subprocess.run) -> set[str] | None:
    """The NIC's global IPv4 and IPv6 addresses (``ip -json addr``); None when unreadable."""
    res = run(["ip", "-json", "address", "show", "dev", nic], check=False, capture_output=True,
              text=True)
    if res.returncode != 0:
        return None
    try:
        links = json.loads(res.stdout or "[]")
    except ValueError:
        return None
    return {info["local"] for link in links for info in link.get("addr_info", [])
            if info.get("scope") == "global" and "local" in info}


def wait_for_static_address(nic: str, address: str, timeout: float = STATIC_WAIT,
                            run=subprocess.run, sleep=time.sleep) -> str | None:
    """Wait until `address` is the NIC's only global address of its family; a problem or None.

    After ``networkctl reconfigure`` networkd drops the DHCP lease, but its
    address can stay on the NIC a moment longer; a connection opened then
    leaves from the DHCP address. The agent starts after network-online,
    which waits for this service, so the static address is the one it uses.
    """
    family = ":" if ":" in address else "."
    found: set[str] | None = None

    def only_the_static_address() -> bool:
        nonlocal found
        found = nic_addresses(nic, run)
        return found is not None and {a for a in found if family in a} == {address}

    if wait_until(only_the_static_address, timeout, sleep=sleep):
        return None
    return (f"{nic} still has {sorted(found or [])} after {timeout:.0f} s, "
            f"not only the static address {address}")


def apply_hostname(name: str | None, sethostname=None) -> bool:
    """Set the (transient) host name, with ``socket.sethostname`` unless given.

    False when there is none to set.
    """
    if not name:
        return False
    if sethostname is None:
        import socket  # lazy: only this step needs it; every import costs boot time

        sethostname = socket.sethostname
    sethostname(name)
    return True


# ------------------------------------------------------------ outputs


def _make_run_dir(run_dir: Path) -> None:
    """/run/tether, world-readable: the agent runs as user tether."""
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(run_dir, 0o755)


def write_settings(settings: firstboot.FirstBootSettings, run_dir: Path = RUN_DIR) -> Path:
    """/run/tether/firstboot.json, world-readable: the agent runs as user tether."""
    _make_run_dir(run_dir)
    path = run_dir / "firstboot.json"
    write_atomic(path, json.dumps(settings.to_json(), indent=2) + "\n", 0o644)
    return path


def export_machine_uuid(run_dir: Path = RUN_DIR, dmi_dir: Path = machine.DMI_DIR) -> str:
    """Copy the DMI product UUID to ``<run_dir>/machine-uuid`` for the agent; the console line.

    Never fatal: without a usable UUID no file is written, and an OSError is
    reported rather than raised; the agent then falls back to /etc/machine-id.
    """
    fallback = "the agent falls back to /etc/machine-id"
    try:
        _make_run_dir(run_dir)
        exported = machine.export_uuid(run_dir / "machine-uuid", dmi_dir)
    except OSError as exc:
        return f"tether first boot: machine UUID not exported ({exc}); {fallback}"
    if exported:
        return "tether first boot: machine UUID exported for the agent"
    return f"tether first boot: no DMI product UUID; {fallback}"


def summary(settings: firstboot.FirstBootSettings) -> str:
    """One console line: where the settings came from and what they are."""
    net = (f"static {settings.address}/{settings.prefix}"
           + (f" via {settings.gateway}" if settings.gateway else "")
           if settings.mode == "static" else "dhcp")
    parts = [f"tether first boot: settings from {settings.source}", f"network {net}"]
    if settings.hostname:
        parts.append(f"hostname {settings.hostname}")
    if settings.dns:
        parts.append("dns " + " ".join(settings.dns))
    if settings.ntp:
        parts.append("ntp " + " ".join(settings.ntp))
    if settings.proxy:
        parts.append("proxy set")
    if settings.home_urls:
        parts.append("home " + " ".join(settings.home_urls))
    if settings.rejected:
        parts.append(f"{len(settings.rejected)} value(s) rejected")
    return "; ".join(parts)


# ------------------------------------------------------------ main


def collect(platform: str, mount_point: Path, mount: bool) -> firstboot.FirstBootSettings:
    """Mount the transport if asked, detect, unmount: the settings."""
    device = mount_transport(mount_point) if mount else None
    try:
        if platform == machine.AWS:
            wait_for_route()
        return firstboot.detect(sources_for(platform, mount_point))
    finally:
        if device is not None:
            unmount(mount_point)


def apply(settings: firstboot.FirstBootSettings, network_dir: Path, reload: bool) -> list[str]:
    """Hostname and network; returns the problems met (printed, never fatal)."""
    problems = []
    try:
        apply_hostname(settings.hostname)
    except OSError as exc:
        problems.append(f"could not set hostname {settings.hostname}: {exc}")
    nic = primary_nic()
    try:
        changed = write_network_unit(network_unit(settings, nic), network_dir)
    except OSError as exc:
        return problems + [f"could not write {network_dir / UNIT_NAME}: {exc}"]
    if changed and reload:
        problems += reload_networkd(nic)
        if settings.mode == "static" and nic and not problems:
            problem = wait_for_static_address(nic, settings.address)
            if problem:
                problems.append(problem)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tether-firstboot",
        description="Apply first-boot settings (OVF environment, EC2 user data) before the agent starts.")
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR)
    parser.add_argument("--network-dir", type=Path, default=NETWORK_DIR)
    parser.add_argument("--mount-point", type=Path, default=MOUNT_POINT)
    parser.add_argument("--no-mount", action="store_true", help="do not look for an ISO transport CD")
    parser.add_argument("--no-apply", action="store_true",
                        help="only write firstboot.json (no hostname, no network change)")
    args = parser.parse_args(argv)

    # First, so the agent's fingerprint does not depend on the settings steps.
    say(export_machine_uuid(args.run_dir))
    platform = machine.detect_platform()
    settings = collect(platform, args.mount_point, mount=not args.no_mount)
    path = write_settings(settings, args.run_dir)
    problems = [] if args.no_apply else apply(settings, args.network_dir, reload=True)
    say(summary(settings))
    for line in settings.messages():
        say(line)
    for line in problems:
        say(f"tether first boot: {line}")
    say(f"tether first boot: settings written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
