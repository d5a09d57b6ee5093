"""What machine the agent runs on: hypervisor platform and a machine fingerprint.

Both come from DMI (``/sys/class/dmi/id``), which every supported hypervisor fills:
VMware (``sys_vendor = VMware, Inc.``), Amazon EC2 (``sys_vendor`` / ``bios_vendor``
``Amazon EC2`` on Nitro, a product UUID starting with ``ec2`` on Xen) and QEMU/KVM.

The fingerprint tells home which *machine* an image credential is used on, so that a
cloned appliance (same image, second VM) is seen. The DMI product UUID is unique per
VM (VMware and EC2 both guarantee it) but is readable by root only: ``tether-firstboot``
(root, before the agent, every boot) copies it with :func:`export_uuid` to
``/run/tether/machine-uuid`` (:data:`FIRSTBOOT_RUN_DIR`, next to ``firstboot.json``)
so the unprivileged agent can read it. That saves the agent unit a Python
``ExecStartPre`` (a second interpreter start at every boot, slow under emulation).
Not ``LoadCredential=``: systemd 252 refuses to start the unit when the file is
absent, as it is on a QEMU guest started without ``-uuid``. :func:`identify` still
looks in ``$CREDENTIALS_DIRECTORY`` first and in ``$RUNTIME_DIRECTORY`` last (where
the unit's former pre-start step put it). On EC2 the instance id
(``board_asset_tag`` on Nitro, world-readable) is preferred: it is what operators
see in the console.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from tether.atomicfile import write_atomic

DMI_DIR = Path("/sys/class/dmi/id")
#: Where tether-firstboot writes ``firstboot.json`` and ``machine-uuid`` (world-readable).
FIRSTBOOT_RUN_DIR = Path("/run/tether")

VMWARE = "vmware"
AWS = "aws"
QEMU = "qemu-kvm"
OTHER = "other"

_EC2_ID = re.compile(r"^i-[0-9a-f]{8,17}$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


@dataclass(frozen=True)
class Machine:
    """The platform and fingerprint, plus where the fingerprint came from."""

    platform: str
    fingerprint: str
    fingerprint_source: str
    vendor: str = ""
    product: str = ""

    def as_dict(self) -> dict:
        return {
            "platform": self.platform,
            "fingerprint": self.fingerprint,
            "fingerprint_source": self.fingerprint_source,
            "vendor": self.vendor,
            "product": self.product,
        }


def _read(directory: Path, name: str) -> str:
    """One DMI field, stripped; empty when absent or unreadable (no root)."""
    try:
        return (directory / name).read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return ""


def detect_platform(dmi_dir: Path = DMI_DIR) -> str:
    """Classify the hypervisor from DMI vendor strings."""
    vendor = _read(dmi_dir, "sys_vendor").lower()
    bios = _read(dmi_dir, "bios_vendor").lower()
    product = _read(dmi_dir, "product_name").lower()
    uuid = _read(dmi_dir, "product_uuid").lower()
    if "vmware" in vendor or "vmware" in product:
        return VMWARE
    if "amazon" in vendor or "amazon" in bios or uuid.startswith("ec2"):
        return AWS
    if "qemu" in vendor or "kvm" in product or "qemu" in product:
        return QEMU
    return OTHER


def identify(
    dmi_dir: Path = DMI_DIR,
    credentials_dir: str | None = None,
    machine_id_file: Path = Path("/etc/machine-id"),
    run_dir: Path | None = FIRSTBOOT_RUN_DIR,
) -> Machine:
    """Platform and the best available machine fingerprint, in order of trust.

    EC2 instance id, then the DMI product UUID (direct, or the ``machine-uuid``
    copy made for the unprivileged agent: see :func:`exported_uuid`), then a hash
    of ``/etc/machine-id`` (only unique if the image's sysprep emptied it, which
    the ``sysprep`` role does).
    """
    platform = detect_platform(dmi_dir)
    vendor, product = _read(dmi_dir, "sys_vendor"), _read(dmi_dir, "product_name")
    asset = _read(dmi_dir, "board_asset_tag")
    if platform == AWS and _EC2_ID.match(asset):
        return Machine(platform, f"ec2:{asset}", "dmi board_asset_tag", vendor, product)
    uuid = _read(dmi_dir, "product_uuid")
    source = "dmi product_uuid"
    if not uuid:
        uuid, source = exported_uuid(credentials_dir, run_dir)
    if _UUID.match(uuid):
        return Machine(platform, f"uuid:{uuid.lower()}", source, vendor, product)
    machine_id = _read(machine_id_file.parent, machine_id_file.name)
    if machine_id:
        import hashlib  # lazy: only this fallback needs it (tether-firstboot imports this module)

        digest = hashlib.sha256(machine_id.encode()).hexdigest()
        return Machine(platform, f"machine-id:{digest}", "/etc/machine-id", vendor, product)
    raise RuntimeError(
        "no machine fingerprint: DMI product_uuid unreadable, no exported "
        "'machine-uuid' and no /etc/machine-id; start the agent after tether-firstboot "
        f"(it exports the machine UUID to {FIRSTBOOT_RUN_DIR / 'machine-uuid'}) or as root"
    )


def exported_uuid(credentials_dir: str | None = None,
                  run_dir: Path | None = FIRSTBOOT_RUN_DIR) -> tuple[str, str]:
    """The first valid ``machine-uuid`` copy and where it came from; ``("", "")`` if none.

    Looked for in ``$CREDENTIALS_DIRECTORY``, then ``run_dir`` (tether-firstboot's
    export), then ``$RUNTIME_DIRECTORY`` (the unit's former pre-start step).
    ``credentials_dir`` given (tests, ``""`` for none) replaces both variables.
    """
    if credentials_dir is None:
        places = [(os.environ.get("CREDENTIALS_DIRECTORY", ""), "machine-uuid credential"),
                  (run_dir, "machine-uuid exported by tether-firstboot"),
                  (os.environ.get("RUNTIME_DIRECTORY", ""),
                   "machine-uuid in the unit's runtime directory")]
    else:
        places = [(credentials_dir, "machine-uuid credential"),
                  (run_dir, "machine-uuid exported by tether-firstboot")]
    for directory, source in places:
        if directory:
            uuid = _read(Path(directory), "machine-uuid")
            if _UUID.match(uuid):
                return uuid, source
    return "", ""


def export_uuid(target: Path, dmi_dir: Path = DMI_DIR) -> bool:
    """Copy the root-only DMI product UUID to ``target`` for the unprivileged agent.

    Run as root before the agent starts (by tether-firstboot, to
    ``FIRSTBOOT_RUN_DIR / "machine-uuid"``). A machine without a usable UUID gets
    no file (the agent then falls back to /etc/machine-id); OSError is left to the
    caller, which reports it and carries on, so the agent always starts.
    """
    uuid = _read(dmi_dir, "product_uuid")
    if not _UUID.match(uuid):
        return False
    write_atomic(target, uuid.lower() + "\n", mode=0o644)
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m tether.agent.machine export-uuid PATH``, for manual use.

    At boot tether-firstboot calls :func:`export_uuid` itself (no extra interpreter).
    """
    import sys
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "export-uuid":
        print("usage: python -m tether.agent.machine export-uuid PATH", file=sys.stderr)
        return 2
    try:
        exported = export_uuid(Path(args[1]))
    except OSError as exc:
        print(f"machine-uuid not exported ({exc}); the agent falls back to /etc/machine-id",
              file=sys.stderr)
        return 0
    print("machine-uuid exported" if exported else
          "no DMI product UUID; the agent falls back to /etc/machine-id")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
