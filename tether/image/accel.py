"""Pick the qemu accelerator by booting a real Linux kernel, not by guessing.

/dev/kvm can exist and open fine while nested KVM still dies on a Linux
guest with "KVM internal error ... emulation failure" (the case on these
build machines). So the probe boots the base disk's own kernel with KVM,
without a root device: a working KVM gets the kernel through all of its
early boot to "VFS: Unable to mount root fs" and the panic=-1 reboot, which
-no-reboot turns into a clean qemu exit within seconds. Anything else (an
emulation failure, an error, a timeout) means TCG.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .cache import Entry

KVM_DEVICE = Path("/dev/kvm")
#: Printed by the kernel after every driver initialised and no root was found.
BOOTED_MARKER = "VFS: Unable to mount root fs"
#: Under TCG the kernel reaches the marker in ~2.5 s here; a working KVM is
#: faster still, so 20 s only ever expires on a hung (broken) KVM.
PROBE_TIMEOUT = 20.0


@dataclass(frozen=True)
class ProbeResult:
    booted: bool
    detail: str


@dataclass(frozen=True)
class Decision:
    accelerator: str  # "kvm" or "tcg"
    reason: str


def kvm_usable_device(device: Path = KVM_DEVICE) -> bool:
    return device.exists() and os.access(device, os.R_OK | os.W_OK)


def decide(device_ok: bool, probe: ProbeResult | None) -> Decision:
    """KVM only when the device is there and a Linux guest really booted."""
    if not device_ok:
        return Decision("tcg", f"{KVM_DEVICE} missing or not accessible")
    if probe is None:
        return Decision("tcg", "no kernel to probe KVM with")
    if probe.booted:
        return Decision("kvm", "a Linux kernel booted under KVM")
    return Decision("tcg", f"KVM did not boot a Linux kernel: {probe.detail}")


def probe_kvm(kernel: Path, timeout: float = PROBE_TIMEOUT) -> ProbeResult:
    """Boot `kernel` under KVM with no root device and watch its console."""
    cmd = [
        "qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-m", "256", "-smp", "1",
        "-nodefaults", "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
        "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1 root=/dev/null",
    ]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"")
        text = out.decode(errors="replace") if isinstance(out, bytes) else out
        return ProbeResult(BOOTED_MARKER in text, f"no result within {timeout:.0f} s")
    except FileNotFoundError:
        return ProbeResult(False, "qemu-system-x86_64 not installed")
    if BOOTED_MARKER in res.stdout:
        return ProbeResult(True, "kernel reached the root mount")
    lines = [l for l in (res.stderr + res.stdout).splitlines() if l.strip()]
    why = next((l for l in lines if "KVM" in l or "error" in l.lower()), lines[-1] if lines else f"exit {res.returncode}")
    return ProbeResult(False, why.strip())


def host_fingerprint(kernel: Path | None) -> str:
    """What the probe's answer depends on: this boot of the host, the probe kernel.

    boot_id changes at every host reboot (a new host kernel or KVM module
    setting), so a cached answer never outlives the conditions it measured.
    """
    boot_id = Path("/proc/sys/kernel/random/boot_id")
    parts = [platform.release(), boot_id.read_text().strip() if boot_id.exists() else "",
             str(kvm_usable_device())]
    if kernel is not None:
        parts.append(hashlib.sha256(kernel.read_bytes()).hexdigest())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def entry(cache_dir: Path, kernel: Path | None) -> Entry:
    """The cached answer for this host and kernel: accel-<fingerprint>.json."""
    return Entry(cache_dir, "accel", host_fingerprint(kernel), (".json",))


def choose(kernel: Path | None, cache_dir: Path | None = None) -> tuple[Decision, bool]:
    """The accelerator to use and whether the answer came from the cache (tether.image.cache)."""
    cached = entry(cache_dir, kernel) if cache_dir is not None else None
    if cached is not None and cached.ready():
        try:
            doc = json.loads(cached.path().read_text())
            return Decision(doc["accelerator"], doc["reason"]), True
        except (ValueError, KeyError):
            pass
    device_ok = kvm_usable_device()
    probe = probe_kvm(kernel) if device_ok and kernel is not None else None
    decision = decide(device_ok, probe)
    if cached is not None:
        with cached.publishing() as out:
            out[".json"].write_text(json.dumps({"accelerator": decision.accelerator, "reason": decision.reason}))
    return decision, False
