"""One boot of a finished image against a home rig: shared by test_boot.py and bench/boot.py.

Every boot runs on a copy-on-write copy of the image's raw disk (qemu
``snapshot=on``: the guest's writes go to a temporary overlay), so the image
stays pristine and every run is a freshly deployed appliance. The guest learns
home's address from an OVF ISO-transport CD (``home.url`` pointing at the
guestfwd address), as an operator sets the vApp property in vSphere.
"""

from __future__ import annotations

import json
import re
import subprocess
import tarfile
import tempfile
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path

from homerig import BootHome, RigError, event_time, wait_event
import vm

from tether.image import bundle

HOME_URL = f"wss://{vm.GUEST_HOME_ADDRESS}:{vm.GUEST_HOME_PORT}/"
#: A getty prompt ("tether login: "), after stripping terminal escapes.
LOGIN_PROMPT = re.compile(r"(?im)\blogin:\s*$")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
MULTI_USER = "multi-user.target"
#: Boot timings collected by the tests, printed at the end of the run (conftest).
TIMINGS: list[tuple[str, dict]] = []


@dataclass(frozen=True)
class BootImage:
    name: str
    disk: Path  # <name>.raw, or the VMDK taken from the OVA
    image_id: str
    connector: str
    home_state: Path


def load_image(image_dir: Path, home_state: Path | None = None) -> BootImage:
    """The image's raw disk, id and home state; RigError says what is missing."""
    name = image_dir.name
    raw, manifest = image_dir / f"{name}.raw", image_dir / "manifest.json"
    for path in (raw, manifest):
        if not path.is_file():
            raise RigError(f"{path} not found: the build of {name} did not finish; "
                           "run `make image` (ls images/ for finished builds)")
    doc = json.loads(manifest.read_text())
    image_id = doc.get("image_id") or (doc.get("credential") or {}).get("image_id")
    if not image_id:
        raise RigError(f"{manifest} names no image_id")
    state = home_state or image_dir.parent / ".home"
    return BootImage(name, raw, image_id, doc.get("connector", ""), state)


def extract_vmdk(image: BootImage, dest: Path) -> BootImage:
    """The same image with its disk taken from the OVA (the streamOptimized VMDK vSphere imports)."""
    ova = image.disk.with_suffix(".ova")
    if not ova.is_file():
        raise RigError(f"{ova} not found: the build did not finish; run `make image`")
    with tarfile.open(ova) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith(".vmdk")), None)
        if member is None:
            raise RigError(f"{ova} holds no .vmdk disk: rebuild the image")
        dest.mkdir(parents=True, exist_ok=True)
        tar.extract(member, dest, filter="data")
    return BootImage(image.name, dest / member.name, image.image_id, image.connector,
                     image.home_state)


def console_text(machine: vm.Vm) -> str:
    """The serial console without terminal escapes."""
    return ANSI.sub("", machine.console_text())


@dataclass
class Boot:
    """A started VM plus the wall-clock time qemu started (home logs wall-clock times)."""

    machine: vm.Vm
    home: BootHome
    started: float
    fingerprint: str
    timings: dict = field(default_factory=dict)

    def wait_enrolled(self, timeout: float) -> dict:
        """Home's ``enrolled`` event for this machine; records seconds from qemu start."""
        event = wait_event(self.home, self.machine, "enrolled", timeout, machine=self.fingerprint)
        self.timings["enrolled_s"] = round(event_time(event) - self.started, 1)
        return event

    def wait_checked_in(self, instance_id: str, timeout: float) -> dict:
        """The first ``hello`` of the enrolled instance (its first check-in)."""
        event = wait_event(self.home, self.machine, "hello", timeout, instance=instance_id,
                           role="instance")
        self.timings["checked_in_s"] = round(event_time(event) - self.started, 1)
        return event

    def wait_clone_refused(self, timeout: float) -> dict:
        event = wait_event(self.home, self.machine, "clone_refused", timeout,
                           machine=self.fingerprint)
        self.timings["refused_s"] = round(event_time(event) - self.started, 1)
        return event

    def home_milestones(self) -> dict:
        """Seconds from qemu start to enrollment and first check-in, as far as home saw them."""
        out = {}
        enrolled = self.home.events("enrolled", machine=self.fingerprint)
        if enrolled:
            out["enrolled_s"] = round(event_time(enrolled[0]) - self.started, 1)
            hello = self.home.events("hello", instance=enrolled[0]["instance"], role="instance")
            if hello:
                out["checked_in_s"] = round(event_time(hello[0]) - self.started, 1)
        return out

    def console(self) -> str:
        return console_text(self.machine)

    def stop(self) -> None:
        self.machine.stop()


def start(image: BootImage, home: BootHome, workdir: Path, ovf_properties: dict[str, str],
          accelerator: str, machine_uuid: str | None = None, **overrides) -> Boot:
    """Write the ISO transport, start qemu on a snapshot of the image, return at once."""
    workdir.mkdir(parents=True, exist_ok=True)
    machine_uuid = machine_uuid or str(uuidlib.uuid4())
    iso = None
    if ovf_properties:
        iso = vm.make_transport_iso(vm.ovf_environment(ovf_properties, vm_id=machine_uuid),
                                    workdir / "ovf-env.iso")
    cfg = vm.VmConfig(disk=image.disk, workdir=workdir, home_port=home.port,
                      ssh_probe_port=vm.free_port(), iso=iso, uuid=machine_uuid,
                      accelerator=accelerator, snapshot=True, **overrides)
    machine = vm.Vm(cfg)
    started = time.time()
    machine.start()
    return Boot(machine, home, started, f"uuid:{machine_uuid.lower()}")


def home_connection_sources(boot: Boot) -> set[str]:
    """Guest addresses of the open connections to home, as qemu's slirp lists them."""
    return vm.guest_sources(boot.machine.usernet(), vm.GUEST_HOME_ADDRESS, vm.GUEST_HOME_PORT)


def reached_multi_user(text: str) -> bool:
    """systemd's "Reached target ... Multi-User System" status line is on the console."""
    return any("Reached target" in line and ("Multi-User" in line or MULTI_USER in line)
               for line in text.splitlines())


#: A drop-in that keeps the agent from ever starting: a slot that never becomes healthy.
BROKEN_AGENT = ("[Service]\n"
                "# test bundle: an agent that never starts, so the slot never becomes healthy\n"
                "ExecStart=\n"
                "ExecStart=/bin/sleep infinity\n")


def recut_bundle(image_bundle: Path, out: Path, version: str, keys, broken: bool = False) -> Path:
    """The image's bundle with another version (and, if asked, an agent that never starts).

    ``keys``: the home's :class:`tether.home.updatekeys.UpdateKeys`. A version
    bump without a second image build: the same root filesystem, signed again.
    """
    with tempfile.TemporaryDirectory(prefix="recut-", dir=out.parent) as tmp:
        content = Path(tmp) / "content"
        subprocess.run(["unsquashfs", "-q", "-n", "-d", str(content), str(image_bundle)], check=True,
                       stdout=subprocess.DEVNULL)
        tar = content / bundle.IMAGE_FILE
        if broken:
            extra = Path(tmp) / "extra"
            dropin = extra / "etc/systemd/system/tether-agent.service.d"
            dropin.mkdir(parents=True)
            (dropin / "zz-broken.conf").write_text(BROKEN_AGENT)
            subprocess.run(["tar", "--append", "--file", str(tar), "--owner=0", "--group=0",
                            "--numeric-owner", "-C", str(extra),
                            "./etc/systemd/system/tether-agent.service.d/zz-broken.conf"], check=True)
        bundle.create(tar, out, version, keys.signing_cert, keys.signing_key)
    return out
