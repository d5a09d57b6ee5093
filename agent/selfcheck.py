"""Self-check: does this VM have what an appliance needs, and can it reach home?

Split in two so the verdict is testable on real-shaped figures without the host:
:func:`measure_host` reads psutil and sysfs into a :class:`Measurements`, and
:func:`evaluate` (pure) compares them with the :class:`Requirements` of the
platform and lists every shortfall with the exact figures. The report dict
(:meth:`Report.as_dict`) is what goes home in hello and what
``tether-agent selfcheck --json`` prints.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from . import machine

GiB = 1024 ** 3
MiB = 1024 ** 2

REPORT_VERSION = 1
OK = "ok"
DEGRADED = "degraded"

#: A VM given 8 GiB shows ~7.7 GiB MemTotal (kernel and firmware reservations):
#: accept that much less than the nominal figure before calling RAM short.
RAM_SLACK = 512 * MiB
#: A 4 GiB swap partition shows one page less (the swap header).
SWAP_SLACK = 16 * MiB
#: Clock skew beyond this breaks short-lived certificates and sync cursors.
MAX_CLOCK_SKEW_S = 60.0


@dataclass(frozen=True)
class Requirements:
    """The floor for one platform. ``swap_bytes=0`` with ``swap_forbidden`` = no swap."""

    vcpu: int = 4
    ram_bytes: int = 8 * GiB
    disk_bytes: int = 16 * GiB
    swap_bytes: int = 4 * GiB
    swap_forbidden: bool = False
    free_bytes: int = 1 * GiB
    max_clock_skew_s: float = MAX_CLOCK_SKEW_S


DEFAULT_REQUIREMENTS = Requirements()
#: On AWS instance storage is EBS and memory is bought instead of swap.
AWS_REQUIREMENTS = Requirements(ram_bytes=12 * GiB, swap_bytes=0, swap_forbidden=True)


def requirements_for(platform: str) -> Requirements:
    return AWS_REQUIREMENTS if platform == machine.AWS else DEFAULT_REQUIREMENTS


@dataclass
class HomeProbe:
    """What the agent learnt about reaching home (None = not checked yet)."""

    host: str = ""
    dns_ok: bool | None = None
    addresses: list[str] = field(default_factory=list)
    reachable: bool | None = None
    clock_skew_s: float | None = None
    error: str = ""


@dataclass
class Measurements:
    """Raw figures of the host; every field can be given by tests."""

    platform: str
    vcpu: int
    ram_bytes: int
    disk_bytes: int
    swap_bytes: int
    free_bytes: int
    home: HomeProbe = field(default_factory=HomeProbe)


@dataclass(frozen=True)
class Shortfall:
    """One unmet requirement: a stable ``check`` name, figures and a sentence."""

    check: str
    required: float | int | str
    measured: float | int | str | None
    message: str


@dataclass
class Report:
    verdict: str
    measured: Measurements
    required: Requirements
    shortfalls: list[Shortfall]
    checked_at: float

    def as_dict(self) -> dict:
        """JSON-ready structure (sent home in hello and status)."""
        measured = asdict(self.measured)
        return {
            "version": REPORT_VERSION,
            "verdict": self.verdict,
            "platform": self.measured.platform,
            "measured": measured,
            "required": asdict(self.required),
            "shortfalls": [asdict(s) for s in self.shortfalls],
            "checked_at": self.checked_at,
        }


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def _resource_shortfalls(m: Measurements, r: Requirements) -> list[Shortfall]:
    out = []
    if m.vcpu < r.vcpu:
        out.append(Shortfall("vcpu", r.vcpu, m.vcpu, f"{m.vcpu} vCPU, need {r.vcpu}"))
    if m.ram_bytes < r.ram_bytes - RAM_SLACK:
        out.append(Shortfall("ram", r.ram_bytes, m.ram_bytes,
                             f"RAM {_gib(m.ram_bytes)}, need {_gib(r.ram_bytes)}"))
    if m.disk_bytes < r.disk_bytes:
        out.append(Shortfall("disk", r.disk_bytes, m.disk_bytes,
                             f"disk {_gib(m.disk_bytes)}, need {_gib(r.disk_bytes)}"))
    if r.swap_forbidden and m.swap_bytes > 0:
        out.append(Shortfall("swap", 0, m.swap_bytes,
                             f"swap {_gib(m.swap_bytes)} configured, this platform "
                             "requires none (disable it)"))
    elif not r.swap_forbidden and m.swap_bytes < r.swap_bytes - SWAP_SLACK:
        out.append(Shortfall("swap", r.swap_bytes, m.swap_bytes,
                             f"swap {_gib(m.swap_bytes)}, need {_gib(r.swap_bytes)}"))
    if m.free_bytes < r.free_bytes:
        out.append(Shortfall("free_space", r.free_bytes, m.free_bytes,
                             f"free space {_gib(m.free_bytes)} in the state directory, "
                             f"need {_gib(r.free_bytes)}"))
    return out


def _home_shortfalls(h: HomeProbe, r: Requirements) -> list[Shortfall]:
    out = []
    if h.dns_ok is False:
        out.append(Shortfall("dns", "resolvable", h.error or "unresolved",
                             f"home host {h.host!r} does not resolve: check DNS "
                             "settings"))
    if h.reachable is False and h.dns_ok is not False:
        out.append(Shortfall("home_reachable", "reachable", h.error or "unreachable",
                             f"home {h.host!r} unreachable on its port: check the "
                             "firewall (outbound 443) and the proxy setting"))
    if h.clock_skew_s is not None and abs(h.clock_skew_s) > r.max_clock_skew_s:
        out.append(Shortfall("clock_skew", r.max_clock_skew_s, round(h.clock_skew_s, 3),
                             f"clock differs from home by {h.clock_skew_s:+.1f} s: "
                             "check NTP"))
    return out


def evaluate(m: Measurements, r: Requirements | None = None,
             now: float | None = None) -> Report:
    """Compare measurements with the platform's floor; pure, no I/O."""
    r = r if r is not None else requirements_for(m.platform)
    shortfalls = _resource_shortfalls(m, r) + _home_shortfalls(m.home, r)
    return Report(DEGRADED if shortfalls else OK, m, r, shortfalls,
                  time.time() if now is None else now)


def physical_disk_bytes(sys_block: Path = Path("/sys/block")) -> int:
    """Sum of whole-disk sizes (virtio, SCSI, NVMe, Xen), not of partitions.

    The appliance's root is one slot of a partitioned disk, so the size of ``/``
    says nothing about the disk the VM was given; ``/sys/block/*/size`` (512-byte
    sectors) does. Loop, RAM, zram and device-mapper devices are not disks.
    """
    total = 0
    try:
        entries = list(sys_block.iterdir())
    except OSError:
        return 0
    for dev in entries:
        if dev.name.startswith(("loop", "ram", "zram", "dm-", "md", "sr", "fd")):
            continue
        if not (dev / "device").exists():
            continue
        try:
            total += int((dev / "size").read_text().strip()) * 512
        except (OSError, ValueError):
            continue
    return total


def measure_host(state_dir: Path, dmi_dir: Path = machine.DMI_DIR,
                 home: HomeProbe | None = None) -> Measurements:
    """Read the real host (psutil, sysfs); figures in bytes."""
    disk = physical_disk_bytes()
    if not disk:  # containers have no block devices: fall back to the root fs
        disk = psutil.disk_usage("/").total
    probe_dir = state_dir if state_dir.exists() else Path("/")
    return Measurements(
        platform=machine.detect_platform(dmi_dir),
        vcpu=psutil.cpu_count(logical=True) or os.cpu_count() or 0,
        ram_bytes=psutil.virtual_memory().total,
        disk_bytes=disk,
        swap_bytes=psutil.swap_memory().total,
        free_bytes=psutil.disk_usage(str(probe_dir)).free,
        home=home or HomeProbe(),
    )


def format_text(report: Report) -> str:
    """Human summary for ``tether-agent selfcheck``."""
    m = report.measured
    lines = [
        f"verdict: {report.verdict}",
        f"platform: {m.platform}",
        f"vcpu: {m.vcpu}   ram: {_gib(m.ram_bytes)}   disk: {_gib(m.disk_bytes)}   "
        f"swap: {_gib(m.swap_bytes)}   free: {_gib(m.free_bytes)}",
    ]
    h = m.home
    if h.host:
        skew = "n/a" if h.clock_skew_s is None else f"{h.clock_skew_s:+.1f} s"
        lines.append(f"home: {h.host}   dns: {h.dns_ok}   reachable: {h.reachable}   "
                     f"clock skew: {skew}")
    for s in report.shortfalls:
        lines.append(f"SHORT {s.check}: {s.message}")
    return "\n".join(lines)
