"""Power a finished appliance disk on under qemu, with the hardware its OVF declares.

A test harness, not part of the product (the appliance and the image
build never run it): used by the boot tests here in tests/e2e, by
bench/boot.py and bench/update.py, which put this folder on sys.path and
`import vm`. The machine matches the
OVA's descriptor (tether.image.ovf): 4 vCPU, 8 GiB RAM, the disk on an NVMe
controller (bootindex 0, which qemu 7.2's SeaBIOS boots), a vmxnet3 NIC and
an IDE CD-ROM for the OVF ISO transport. The machine type is ``pc``
(i440fx): its PIIX IDE controller is what the descriptor's CD-ROM sits on,
and the Debian cloud kernel has ata_piix but no AHCI driver, so a q35 CD-ROM
would be invisible to the guest.

Networking is qemu user networking with ``restrict=on``: the guest reaches
nothing but the ``guestfwd`` address, where every guest connection starts a
new ``socat`` to home on the host's loopback (a chardev guestfwd would carry
one connection only, and the agent opens several sockets). An optional
``hostfwd`` from 127.0.0.1 to guest port 22 lets a test prove nothing listens
there. The serial console goes to a file; the VM is stopped by its PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self
from xml.sax import saxutils

from tether.image import accel
from tether.image.errors import BuildError

#: Guest-side address and port of home (inside qemu's 10.0.2.0/24 user network).
GUEST_HOME_ADDRESS = "10.0.2.100"
GUEST_HOME_PORT = 443
#: The user network qemu hands out by DHCP: gateway .2, DNS .3, first lease .15.
GUEST_NETWORK = "10.0.2.0/24"
GUEST_GATEWAY = "10.0.2.2"
GUEST_DNS = "10.0.2.3"
GUEST_DHCP_ADDRESS = "10.0.2.15"
#: The hardware tether.image.ovf.Hardware declares for the OVA.
OVF_CPUS = 4
OVF_MEMORY_MIB = 8192
#: Volume label vSphere gives the ISO it attaches for the OVF ISO transport.
OVF_ISO_LABEL = "OVF ENV"
OVF_ENV_NS = "http://schemas.dmtf.org/ovf/environment/1"


class VmError(BuildError):
    """The VM cannot be started or driven; the message says what to do."""


@dataclass
class VmConfig:
    """Everything that shapes one qemu run. Only `disk` and `workdir` are required."""

    disk: Path
    workdir: Path
    home_port: int | None = None          # host loopback port of home (guestfwd target)
    home_address: str = GUEST_HOME_ADDRESS
    home_guest_port: int = GUEST_HOME_PORT
    ssh_probe_port: int | None = None     # host 127.0.0.1 port forwarded to guest :22
    cpus: int = OVF_CPUS
    memory_mib: int = OVF_MEMORY_MIB
    iso: Path | None = None               # CD-ROM (e.g. the OVF ISO transport)
    uuid: str | None = None               # SMBIOS system UUID; a new one when None
    mac: str | None = None                # NIC MAC; derived from the UUID when None
    accelerator: str = "tcg"
    disk_format: str | None = None        # probed with qemu-img when None
    snapshot: bool = False                # discard the guest's writes (read-only disk)
    relay: tuple[str, ...] = ("socat",)
    extra: list[str] = field(default_factory=list)

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.workdir / "qemu.log"

    @property
    def monitor_socket(self) -> Path:
        return self.workdir / "monitor.sock"


# ------------------------------------------------------------ command line


def check_config(cfg: VmConfig) -> None:
    """Refuse a configuration qemu would reject later with a less helpful message."""
    if not cfg.disk.is_file():
        raise VmError(f"disk {cfg.disk} not found: build an image with `make image` "
                      "(images/<name>/<name>.raw) or give an existing disk")
    if cfg.iso is not None and not cfg.iso.is_file():
        raise VmError(f"ISO {cfg.iso} not found")
    if cfg.cpus < 1 or cfg.memory_mib < 256:
        raise VmError(f"-smp {cfg.cpus} / -m {cfg.memory_mib} MiB: need at least 1 vCPU and 256 MiB")
    if cfg.uuid is not None:
        try:
            uuidlib.UUID(cfg.uuid)
        except ValueError:
            raise VmError(f"machine UUID {cfg.uuid!r} is not a UUID (like {uuidlib.uuid4()})") from None
    if cfg.accelerator not in ("tcg", "kvm"):
        raise VmError(f"accelerator {cfg.accelerator!r}: use tcg or kvm")
    if len(str(cfg.monitor_socket)) > 100:
        raise VmError(f"work directory {cfg.workdir} is too long for qemu's monitor socket "
                      "path (108 bytes at most): use a shorter one")
    for name, port in (("home", cfg.home_port), ("ssh probe", cfg.ssh_probe_port)):
        if port is not None and not 1 <= port <= 65535:
            raise VmError(f"{name} port {port} is not in 1..65535")


def mac_for(machine_uuid: str) -> str:
    """A stable locally administered MAC per machine UUID (a clone gets a new MAC,
    as vSphere gives a cloned VM one)."""
    raw = uuidlib.UUID(machine_uuid).bytes
    return "52:54:00:" + ":".join(f"{b:02x}" for b in raw[-3:])


def netdev_arg(cfg: VmConfig) -> str:
    """-netdev user,restrict=on with the guestfwd to home and the optional port-22 probe."""
    parts = ["user", "id=n0", "restrict=on", f"net={GUEST_NETWORK}", "ipv6=off"]
    if cfg.home_port is not None:
        relay = " ".join(cfg.relay + ("STDIO", f"TCP:127.0.0.1:{cfg.home_port}"))
        if "," in relay:
            raise VmError(f"relay command {relay!r} must not contain commas (qemu option syntax)")
        parts.append(f"guestfwd=tcp:{cfg.home_address}:{cfg.home_guest_port}-cmd:{relay}")
    if cfg.ssh_probe_port is not None:
        parts.append(f"hostfwd=tcp:127.0.0.1:{cfg.ssh_probe_port}-:22")
    return ",".join(parts)


def command(cfg: VmConfig, machine_uuid: str) -> list[str]:
    """The qemu argv (pure: no probing, so it is unit tested as is)."""
    fmt = cfg.disk_format or "raw"
    drive = f"if=none,id=d0,file={cfg.disk},format={fmt},cache=unsafe"
    if cfg.snapshot:
        drive += ",snapshot=on"
    cpu = "host" if cfg.accelerator == "kvm" else "max"
    argv = [
        "qemu-system-x86_64",
        "-machine", f"pc,accel={cfg.accelerator}",
        "-cpu", cpu,
        "-smp", str(cfg.cpus),
        "-m", str(cfg.memory_mib),
        "-uuid", machine_uuid,
        "-nodefaults", "-display", "none", "-vga", "none",
        "-monitor", f"unix:{cfg.monitor_socket},server=on,wait=off",
        "-serial", f"file:{cfg.console_log}",
        "-drive", drive,
        "-device", f"nvme,drive=d0,serial=tether-{machine_uuid[:8]},bootindex=0",
        "-netdev", netdev_arg(cfg),
        "-device", f"vmxnet3,netdev=n0,mac={cfg.mac or mac_for(machine_uuid)}",
    ]
    if cfg.iso is not None:
        argv += ["-drive", f"if=ide,index=1,media=cdrom,readonly=on,file={cfg.iso}"]
    return argv + list(cfg.extra)


# ------------------------------------------------------------ environment


def disk_format(path: Path) -> str:
    """raw or vmdk etc., as qemu-img sees it (never guessed by qemu at boot time)."""
    try:
        out = subprocess.run(["qemu-img", "info", "--output=json", str(path)],
                             capture_output=True, text=True, check=True, timeout=60).stdout
    except FileNotFoundError:
        raise VmError("qemu-img not found: apt-get install qemu-utils") from None
    except subprocess.CalledProcessError as exc:
        raise VmError(f"qemu-img cannot read {path}: {exc.stderr.strip()}") from None
    return json.loads(out)["format"]


def require_tools(cfg: VmConfig) -> None:
    """qemu, and the relay when home is forwarded: say which Debian package is missing."""
    if shutil.which("qemu-system-x86_64") is None:
        raise VmError("qemu-system-x86_64 not found: apt-get install qemu-system-x86")
    if cfg.home_port is not None and shutil.which(cfg.relay[0]) is None:
        raise VmError(f"{cfg.relay[0]} not found (it carries each guest connection to home): "
                      "apt-get install socat")


def choose_accelerator(cache_dir: Path | None) -> accel.Decision:
    """KVM only when the image build's probe booted a kernel with it (accel.choose).

    The probe needs a kernel; the image build keeps the base disk's kernel in
    images/.cache/. Without one, TCG: slow but always works.
    """
    found = cache_dir is not None and cache_dir.is_dir()
    kernels = sorted(cache_dir.glob("base-*.vmlinuz")) if found else []
    decision, _ = accel.choose(kernels[-1] if kernels else None, cache_dir if found else None)
    return decision


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the kernel picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------ OVF ISO transport


def ovf_environment(properties: dict[str, str], vm_id: str = "tether") -> str:
    """An ovf-env.xml document as vSphere writes it for the ISO transport."""
    props = "\n".join(
        f'      <Property oe:key={saxutils.quoteattr(k)} oe:value={saxutils.quoteattr(v)}/>'
        for k, v in properties.items())
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<Environment xmlns="{OVF_ENV_NS}" xmlns:oe="{OVF_ENV_NS}"\n'
        '     xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"\n'
        '     xmlns:ve="http://www.vmware.com/schema/ovfenv"\n'
        f'     oe:id="" ve:vCenterId={saxutils.quoteattr(vm_id)}>\n'
        '   <PlatformSection>\n'
        '      <Kind>VMware ESXi</Kind>\n'
        '      <Version>8.0.2</Version>\n'
        '      <Vendor>VMware, Inc.</Vendor>\n'
        '      <Locale>en</Locale>\n'
        '   </PlatformSection>\n'
        '   <PropertySection>\n'
        f'{props}\n'
        '   </PropertySection>\n'
        '</Environment>\n')


def make_transport_iso(document: str, out: Path) -> Path:
    """Write `document` as ovf-env.xml onto an ISO 9660 image (xorriso), like vSphere."""
    if shutil.which("xorriso") is None:
        raise VmError("xorriso not found (it writes the OVF environment ISO): apt-get install xorriso")
    staging = out.with_suffix(".d")
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "ovf-env.xml").write_text(document)
    res = subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-J", "-r", "-V", OVF_ISO_LABEL,
                          "-o", str(out), str(staging)], capture_output=True, text=True, check=False)
    shutil.rmtree(staging, ignore_errors=True)
    if res.returncode != 0:
        raise VmError(f"xorriso could not write {out}: {res.stderr.strip()[-500:]}")
    return out


# ------------------------------------------------------------ running VM


@dataclass
class PortProbe:
    """What a connection to a forwarded port saw: `open` only if the guest sent data."""

    state: str     # "open" (guest answered), "closed" (connection ended), "silent"
    banner: bytes = b""


def probe_forwarded_port(port: int, wait: float = 5.0) -> PortProbe:
    """Connect to a hostfwd port on 127.0.0.1 and see whether the guest answers.

    slirp accepts on the host side before it knows the guest's answer; a guest
    that refuses makes slirp close the connection (``closed``); a guest whose
    firewall drops the SYN leaves it hanging (``silent``). A listening sshd
    (the only thing port 22 would have) sends its banner at once (``open``).
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
            sock.settimeout(wait)
            try:
                data = sock.recv(256)
            except TimeoutError:
                return PortProbe("silent")
            except ConnectionResetError:
                return PortProbe("closed")
            return PortProbe("open", data) if data else PortProbe("closed")
    except (ConnectionRefusedError, ConnectionResetError):
        return PortProbe("closed")


def hmp(socket_path: Path, command_line: str, timeout: float = 10.0) -> str:
    """Run one human-monitor command on qemu's monitor socket; its output text."""
    prompt = b"(qemu) "
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        data = b""
        while not data.endswith(prompt):  # banner, then the first prompt
            chunk = sock.recv(4096)
            if not chunk:
                raise VmError(f"qemu monitor {socket_path} closed before its prompt")
            data += chunk
        sock.sendall(command_line.encode() + b"\n")
        data = b""
        while not data.endswith(prompt):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    text = data.decode(errors="replace").replace("\r", "")
    text = text[: -len(prompt)] if text.endswith(prompt.decode()) else text
    # qemu echoes the command line first
    return text.split("\n", 1)[1] if text.startswith(command_line) else text


def guest_sources(usernet: str, address: str, port: int) -> set[str]:
    """Guest addresses with a TCP connection to `address:port` in "info usernet" output.

    slirp lists a guest-initiated connection (a guestfwd one included) as
    ``TCP[ESTABLISHED]  15  10.0.2.15 43210  10.0.2.100  443  0  0``: the
    guest's address and port, then the destination.
    """
    sources = set()
    for line in usernet.splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[0].startswith("TCP[") and fields[4:6] == [address, str(port)]:
            sources.add(fields[2])
    return sources


class Vm:
    """One running qemu; a context manager that always stops it by PID."""

    def __init__(self, cfg: VmConfig):
        self.cfg = cfg
        self.uuid = cfg.uuid or str(uuidlib.uuid4())
        self.proc: subprocess.Popen | None = None
        self.started_at: float | None = None  # time.monotonic() at qemu start

    def start(self) -> Vm:
        """Check the configuration and the tools, then start qemu (returns at once)."""
        cfg = self.cfg
        check_config(cfg)
        require_tools(cfg)
        if cfg.disk_format is None:
            cfg.disk_format = disk_format(cfg.disk)
        cfg.workdir.mkdir(parents=True, exist_ok=True)
        cfg.console_log.write_bytes(b"")
        argv = command(cfg, self.uuid)
        (cfg.workdir / "qemu.argv").write_text(" ".join(argv) + "\n")
        with open(cfg.qemu_log, "wb") as log:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def elapsed(self) -> float:
        """Seconds since qemu was started."""
        return time.monotonic() - (self.started_at or time.monotonic())

    def console_text(self) -> str:
        try:
            return self.cfg.console_log.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def qemu_output(self) -> str:
        try:
            return self.cfg.qemu_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def usernet(self) -> str:
        """qemu's view of the user network (slirp's sockets, NAT and guestfwd)."""
        return hmp(self.cfg.monitor_socket, "info usernet")

    def wait_for(self, condition: Callable[[], object], timeout: float, what: str,
                 interval: float = 0.5):
        """Poll `condition` until it returns something truthy; fail if qemu dies or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if not self.running():
                raise VmError(f"qemu exited ({self.proc.returncode if self.proc else '?'}) while "
                              f"waiting for {what}:\n{self.qemu_output()[-2000:]}\n"
                              f"console tail:\n{self.console_text()[-2000:]}")
            if time.monotonic() >= deadline:
                raise VmError(f"no {what} within {timeout:.0f} s of waiting; console tail "
                              f"({self.cfg.console_log}):\n{self.console_text()[-3000:]}")
            time.sleep(interval)

    def wait_console(self, marker: str, timeout: float) -> float:
        """Wait until `marker` shows on the serial console; seconds since qemu start."""
        self.wait_for(lambda: marker in self.console_text(), timeout, f"{marker!r} on the console")
        return self.elapsed()

    def _session_members(self) -> list[int]:
        """PIDs in qemu's session other than qemu: the relays slirp spawned.

        qemu is started as a session leader; glib double-forks the relays, so
        they are not qemu's children, but they stay in its session.
        """
        if self.pid is None:
            return []
        members = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            pid = int(stat.parent.name)
            if pid != self.pid and len(fields) > 3 and fields[3] == str(self.pid):
                members.append(pid)
        return members

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM qemu (a power-off for the guest), then SIGKILL; relays go too, by PID."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        # The kernel keeps a session id from being reused while members live.
        for pid in self._session_members():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def __enter__(self) -> Self:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------ manual use


def main(argv: list[str] | None = None) -> int:
    """Boot a disk by hand and follow its console until Ctrl-C (then stop qemu).

    python tests/e2e/vm.py --disk images/N/N.raw --home-port 8443 [--home-url-iso]
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python tests/e2e/vm.py", description=main.__doc__)
    parser.add_argument("--disk", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tether-vm"))
    parser.add_argument("--home-port", type=int, help="home's port on 127.0.0.1 (guestfwd target)")
    parser.add_argument("--iso", type=Path, help="CD-ROM image (e.g. an OVF environment ISO)")
    parser.add_argument("--home-url-iso", action="store_true",
                        help=f"write an ISO whose ovf-env.xml sets home.url to "
                             f"wss://{GUEST_HOME_ADDRESS}:{GUEST_HOME_PORT}/")
    parser.add_argument("--uuid", help="machine UUID (a clone: another one)")
    parser.add_argument("--smp", type=int, default=OVF_CPUS)
    parser.add_argument("--memory", type=int, default=OVF_MEMORY_MIB, help="MiB")
    parser.add_argument("--write", action="store_true", help="write to the disk (default: snapshot)")
    args = parser.parse_args(argv)
    iso = args.iso
    if args.home_url_iso:
        args.workdir.mkdir(parents=True, exist_ok=True)
        iso = make_transport_iso(ovf_environment(
            {"home.url": f"wss://{GUEST_HOME_ADDRESS}:{GUEST_HOME_PORT}/"}), args.workdir / "env.iso")
    cache = Path(__file__).resolve().parents[2] / "images" / ".cache"
    cfg = VmConfig(disk=args.disk, workdir=args.workdir, home_port=args.home_port, iso=iso,
                   uuid=args.uuid, cpus=args.smp, memory_mib=args.memory,
                   accelerator=choose_accelerator(cache).accelerator, snapshot=not args.write,
                   ssh_probe_port=free_port())
    try:
        with Vm(cfg) as machine:
            print(f"qemu pid {machine.pid}, uuid {machine.uuid}, console {cfg.console_log}, "
                  f"monitor {cfg.monitor_socket}; Ctrl-C stops it", file=sys.stderr)
            shown = 0
            while machine.running():
                text = machine.console_text()
                sys.stdout.write(text[shown:])
                sys.stdout.flush()
                shown = len(text)
                time.sleep(0.5)
    except VmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
