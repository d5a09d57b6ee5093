"""The per-build disk: a sparse copy of the cached base with a build-only key.

Every build gets a fresh ed25519 key pair that exists only for this build:
its public half goes into root's authorized_keys of the copy (Packer and
Ansible log in with it), the sysprep role deletes it before the image is
sealed, and the private half stays in the build's work directory, which is
removed afterwards. The cached base itself is never modified.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tether.atomicfile import replacing

from . import layout as layout_mod
from .diskio import attached, mounted
from .proc import run


@dataclass(frozen=True)
class BuildKey:
    private: Path
    public: Path

    def public_line(self) -> str:
        return self.public.read_text().strip()


def make_build_key(work: Path, comment: str = "tether-build-only") -> BuildKey:
    private = work / "build_key"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(private)],
        what="generating the build-only SSH key")
    os.chmod(private, 0o600)
    return BuildKey(private, private.with_suffix(".pub"))


def copy_sparse(source: Path, dest: Path) -> None:
    """Copy a raw disk keeping its holes (16 GiB apparent, ~1 GiB real)."""
    with replacing(dest, mode=0o644) as tmp:
        run(["cp", "--sparse=always", str(source), str(tmp)], what=f"copying {source.name}")


#: Units enabled by the shared roles that must not run during the build's own
#: boot of the provisioned layer: the agent would start (and, once the identity
#: role wrote its files, make an instance key in the image), the first-boot
#: service would configure the build VM, and the firewall would drop the
#: build's SSH connection (inbound: replies only). A drop-in with a condition that never
#: holds skips them (no restart loop: a failed condition is no failure); the
#: sysprep role removes the drop-ins (sysprep_build_holds).
HOLD_UNITS = ("tether-agent.service", "tether-firstboot.service", "nftables.service")
HOLD_DROPIN = "zz-tether-build-hold.conf"


def hold_paths(units: tuple[str, ...] = HOLD_UNITS) -> list[str]:
    """Paths (on the guest) of the build-time hold drop-ins."""
    return [f"/etc/systemd/system/{unit}.d/{HOLD_DROPIN}" for unit in units]


def hold_dropin() -> str:
    return ("# Written by the image build (tether.image.builddisk) for the build VM's boot only;\n"
            "# the sysprep role removes it. The appliance runs this unit from its first real boot.\n"
            "[Unit]\n"
            "ConditionPathExists=/nonexistent/tether-build-hold\n")


def inject_key(disk: Path, key: BuildKey, lay: layout_mod.Layout, hold_units: tuple[str, ...] = ()) -> None:
    """Write the key into root's authorized_keys on root-a of `disk` (and the holds)."""
    root_a = lay.by_label("root-a").number
    with contextlib.ExitStack() as stack:
        loop = stack.enter_context(attached(disk, len(lay.partitions)))
        mnt = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".mnt-", dir=disk.parent)))
        root = stack.enter_context(mounted(loop.partition(root_a), mnt / "root"))
        ssh = root / "root/.ssh"
        ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(ssh, 0o700)
        auth = ssh / "authorized_keys"
        auth.write_text(key.public_line() + "\n")
        os.chmod(auth, 0o600)
        for guest_path in hold_paths(hold_units):
            dropin = root / guest_path.lstrip("/")
            dropin.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            dropin.write_text(hold_dropin())
            os.chmod(dropin, 0o644)


def prepare(base: Path, work: Path, lay: layout_mod.Layout,
            hold_units: tuple[str, ...] = ()) -> tuple[Path, BuildKey]:
    """Copy the base into `work` and give it a fresh build key (and hold `hold_units`).

    The copy's name deliberately does not end in `.raw`: Packer 1.6.6 then
    converts it into its output directory with `qemu-img convert` (sparse,
    seconds) instead of copying all 16 GiB byte for byte.
    """
    disk = work / "disk.img"
    copy_sparse(base, disk)
    key = make_build_key(work)
    inject_key(disk, key, lay, hold_units)
    return disk, key
