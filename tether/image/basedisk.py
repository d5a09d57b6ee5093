"""The cached base disk: Debian 12 by debootstrap on the appliance layout.

Building it takes minutes (download + install of every package), so it is
cached under images/.cache/ by a SHA256 of everything that goes into it:
package list, partition layout, suite and variant, the boot/mount files and
STEP_VERSION (bump it when this module changes what it writes). Same inputs,
same key: the next build reuses the disk; any change makes a new one.

The disk and a copy of its kernel (for the accelerator probe) are one
entry of tether.image.cache: written under temporary names and renamed only
when complete, so an interrupted build never leaves a disk that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import bootconf, layout
from .cache import Entry
from .diskio import attached, chroot_mounts, in_chroot, mounted
from .errors import BuildError
from .mirror import find_mirror
from .proc import require, run

STEP_VERSION = "7"
SUITE = "bookworm"
VARIANT = "minbase"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
PACKAGES_FILE = Path(__file__).with_name("data") / "packages.txt"
#: Reboots a trial boot of a new slot that never becomes healthy (see the file).
TRIAL_DEADLINE_FILE = Path(__file__).with_name("data") / "trial_deadline.py"
TRIAL_DEADLINE_UNIT = """\
# tether: reboot a trial boot of a new root slot that is not marked good in time
# (written by tether.image.basedisk; the script says when it acts)
[Unit]
Description=tether: deadline for a trial boot of a new root slot
RequiresMountsFor=/boot/grub /var/lib/tether

[Service]
Type=simple
ExecStart=/usr/bin/python3 /usr/local/sbin/tether-trial-deadline

[Install]
WantedBy=multi-user.target
"""
#: Drivers the kernel must carry for what the OVF declares and AWS uses.
REQUIRED_MODULES = ("nvme", "vmxnet3")

#: dpkg config that keeps documentation and translations out of the image
#: (about 65 MB of the 500 MB root; the OVA is downloaded by every customer).
#: Copyright files stay: the licences travel with the binaries.
DPKG_SLIM = """\
# tether: no documentation or translations in the appliance (written by tether.image)
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
path-exclude=/usr/share/lintian/*
"""
SLIM_DIRS = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian")
SLIM_KEEP = ("copyright", "locale.alias")


def read_packages(path: Path = PACKAGES_FILE) -> list[str]:
    """Package names from packages.txt: one a line, '#' starts a comment."""
    names = []
    for line in path.read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            names.append(name)
    if not names:
        raise BuildError(f"{path} lists no packages")
    return names


@dataclass(frozen=True)
class BaseInputs:
    """Everything the base disk depends on; its hash is the cache key."""

    packages: tuple[str, ...]
    layout: layout.Layout
    suite: str = SUITE
    variant: str = VARIANT
    step_version: str = STEP_VERSION

    def key(self) -> str:
        doc = {
            "packages": sorted(set(self.packages)),
            "layout": self.layout.describe(),
            "suite": self.suite,
            "variant": self.variant,
            "step": self.step_version,
            "fstab": bootconf.fstab(),
            "grub": bootconf.grub_cfg(),
            "grubenv": bootconf.GRUBENV_INITIAL,
            "network": bootconf.networkd_dhcp(),
            "dpkg": DPKG_SLIM,
            "initramfs": INITRAMFS_OFF,
            "trial_deadline": TRIAL_DEADLINE_FILE.read_text(),
            "trial_deadline_unit": TRIAL_DEADLINE_UNIT,
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def default_inputs() -> BaseInputs:
    return BaseInputs(packages=tuple(read_packages()), layout=layout.plan())


@dataclass(frozen=True)
class BaseDisk:
    path: Path  # the raw disk
    kernel: Path  # a copy of its vmlinuz, for the accelerator probe
    key: str
    cached: bool


def entry(cache_dir: Path, key: str) -> Entry:
    """The cache entry of a base disk: base-<key>.raw and its kernel base-<key>.vmlinuz."""
    return Entry(cache_dir, "base", key, (".raw", ".vmlinuz"))


def ensure(cache_dir: Path, inputs: BaseInputs, say=print) -> BaseDisk:
    """Return the cached base disk for `inputs`, building it when missing."""
    key = inputs.key()
    cached = entry(cache_dir, key)
    disk, kernel = cached.path(".raw"), cached.path(".vmlinuz")
    if cached.ready():
        say(f"cached base disk {disk.name} (key {key[:16]})")
        return BaseDisk(disk, kernel, key, cached=True)
    for tool, pkg in (("debootstrap", "debootstrap"), ("sfdisk", "fdisk"), ("mkfs.ext4", "e2fsprogs"),
                      ("mkswap", "util-linux"), ("losetup", "mount")):
        require(tool, pkg)
    if not KEYRING.is_file():
        raise BuildError(f"{KEYRING} missing: install the Debian package 'debian-archive-keyring'")
    mirror = find_mirror(inputs.suite)
    say(f"building base disk (key {key[:16]}) from the apt mirror configured on this machine")
    with cached.publishing() as out:
        _build(out[".raw"], out[".vmlinuz"], inputs, mirror, cache_dir / "debs", say)
    return BaseDisk(disk, kernel, key, cached=False)


def _build(disk: Path, kernel_out: Path, inputs: BaseInputs, mirror: str, debs: Path, say) -> None:
    lay = inputs.layout
    with open(disk, "wb") as fh:
        fh.truncate(lay.disk_size)  # sparse
    run(["sfdisk", "--quiet", "--wipe", "always", str(disk)], input=lay.sfdisk_script(),
        what="writing the GPT partition table")
    with contextlib.ExitStack() as stack:
        loop = stack.enter_context(attached(disk, len(lay.partitions)))
        _make_filesystems(loop, lay)
        mnt = Path(stack.enter_context(_tempdir(disk.parent)))
        root = stack.enter_context(mounted(loop.partition(lay.by_label("root-a").number), mnt / "root"))
        data_part = loop.partition(lay.by_label("data").number)
        stack.enter_context(mounted(data_part, root / "data"))
        _debootstrap(root, inputs, mirror, debs, say)
        # GRUB's files and grubenv go on the boot partition, outside both slots.
        grub_dir = root / bootconf.BOOT_MOUNT.lstrip("/")
        grub_dir.mkdir(parents=True, exist_ok=True)
        stack.enter_context(mounted(loop.partition(lay.by_label("boot").number), grub_dir))
        with chroot_mounts(root):
            _configure(root, loop.device, say)
        _check_kernel(root)
        shutil.copyfile(_kernel_image(root), kernel_out)
        run(["fstrim", str(root / "data")], what="trimming the data partition")
        run(["fstrim", str(grub_dir)], what="trimming the boot partition")
        run(["fstrim", str(root)], what="trimming root-a")


@contextlib.contextmanager
def _tempdir(parent: Path):
    path = Path(tempfile.mkdtemp(prefix=".mnt-", dir=parent))
    try:
        yield path
    finally:
        if not _has_mounts(path):  # never delete through a mount that failed to go
            shutil.rmtree(path, ignore_errors=True)


def _has_mounts(path: Path) -> bool:
    text = Path("/proc/self/mounts").read_text()
    return any(line.split()[1].startswith(str(path)) for line in text.splitlines())


def _make_filesystems(loop, lay: layout.Layout) -> None:
    for part in lay.partitions:
        dev = loop.partition(part.number)
        if part.fs == "ext4":
            run(["mkfs.ext4", "-q", "-F", "-L", part.label, dev], what=f"mkfs.ext4 on {part.label}")
        elif part.fs == "swap":
            run(["mkswap", "-L", part.label, dev], what="mkswap")


def _debootstrap(root: Path, inputs: BaseInputs, mirror: str, debs: Path, say) -> None:
    debs = debs.resolve()
    debs.mkdir(parents=True, exist_ok=True)
    cmd = [
        "debootstrap", f"--variant={inputs.variant}", "--merged-usr", "--components=main",
        f"--include={','.join(inputs.packages)}", f"--keyring={KEYRING}", f"--cache-dir={debs}",
        inputs.suite, str(root), mirror,
    ]
    say(f"debootstrap {inputs.suite} ({inputs.variant} + {len(inputs.packages)} packages)")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8"})
    log: list[str] = []
    for line in _progress_lines(proc.stdout, log):
        say(line)
    if proc.wait() != 0:
        tail = "\n".join("    " + x for x in log[-25:])
        raise BuildError(
            f"debootstrap failed (exit {proc.returncode}). Check that apt can reach the mirror "
            f"(apt-get update) and that every name in {PACKAGES_FILE} exists in Debian {inputs.suite}:\n{tail}"
        )


_PHASE_ENDINGS = ("packages...", "system...")  # "I: Unpacking the base system..."


def _progress_lines(stream, log: list[str]):
    """Condense debootstrap's one-line-per-package output to a progress count.

    Phase changes and warnings/errors are shown as they come; per-package
    lines (Retrieving/Validating/Extracting/Unpacking/Configuring X) are
    counted and shown every 40 packages so the log stays readable.
    """
    verb, count = None, 0
    for raw in stream:
        line = raw.rstrip()
        log.append(line)
        words = line.split()
        is_pkg = len(words) in (3, 4) and words[0] == "I:" and words[1] in (
            "Retrieving", "Validating", "Extracting", "Unpacking", "Configuring") and not line.endswith(_PHASE_ENDINGS)
        if is_pkg:
            if words[1] != verb:
                verb, count = words[1], 0
            count += 1
            if count % 40 == 1:
                yield f"debootstrap: {verb.lower()} packages... ({count}: {words[2]})"
            continue
        verb = None
        if line.startswith(("I: ", "W: ", "E: ")):
            yield f"debootstrap: {line[3:]}"


def _configure(root: Path, device: str, say) -> None:
    say("configuring: fstab, data partition, network, GRUB (BIOS, serial console, A/B grubenv on the boot partition)")
    (root / "etc/fstab").write_text(bootconf.fstab())
    (root / "etc/hostname").write_text("tether\n")
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\ttether\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    net = root / "etc/systemd/network/80-dhcp.network"
    net.parent.mkdir(parents=True, exist_ok=True)
    net.write_text(bootconf.networkd_dhcp())
    in_chroot(root, ["systemctl", "enable", "systemd-networkd.service", "systemd-resolved.service"],
              what="enabling systemd-networkd")
    _move_state_to_data(root)
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(ssh_dir, 0o700)
    _install_grub(root, device)
    _install_trial_deadline(root)
    _kernel_symlinks(root)
    _drop_initramfs(root)
    _slim(root)
    in_chroot(root, ["apt-get", "clean"], what="apt-get clean")


def _slim(root: Path) -> None:
    """Drop docs and translations now, and tell dpkg to skip them later."""
    cfg = root / "etc/dpkg/dpkg.cfg.d/01-tether-slim"
    cfg.write_text(DPKG_SLIM)
    for rel in SLIM_DIRS:
        top = root / rel
        if not top.is_dir():
            continue
        for path in sorted(top.rglob("*"), reverse=True):  # children before parents
            if path.is_symlink() or path.is_file():
                if path.name not in SLIM_KEEP:
                    path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()


def _move_state_to_data(root: Path) -> None:
    """/var/log and /var/lib/tether live on the data partition (bind mounts)."""
    data = root / "data"
    (data / "log").mkdir(exist_ok=True)
    (data / "tether").mkdir(mode=0o700, exist_ok=True)
    os.chmod(data / "log", 0o755)
    varlog = root / "var/log"
    for entry in list(varlog.iterdir()):
        shutil.move(str(entry), str(data / "log" / entry.name))
    (root / "var/lib/tether").mkdir(mode=0o700, exist_ok=True)


def _install_grub(root: Path, device: str) -> None:
    in_chroot(root, ["grub-install", "--target=i386-pc", "--boot-directory=/boot",
                     "--modules=part_gpt ext2", device], what="grub-install (BIOS)")
    (root / "boot/grub/grub.cfg").write_text(bootconf.grub_cfg())
    env_args = [f"{k}={v}" for k, v in bootconf.GRUBENV_INITIAL.items()]
    in_chroot(root, ["grub-editenv", "/boot/grub/grubenv", "create"], what="grub-editenv create")
    in_chroot(root, ["grub-editenv", "/boot/grub/grubenv", "set", *env_args], what="grub-editenv set")
    # The A/B grub.cfg is static: keep kernel hooks from regenerating it.
    for hook in ("/etc/kernel/postinst.d/zz-update-grub", "/etc/kernel/postrm.d/zz-update-grub"):
        if (root / hook.lstrip("/")).exists():
            in_chroot(root, ["dpkg-divert", "--local", "--rename", "--add", hook], what=f"diverting {hook}")


def _install_trial_deadline(root: Path) -> None:
    script = root / "usr/local/sbin/tether-trial-deadline"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(TRIAL_DEADLINE_FILE.read_text())
    os.chmod(script, 0o755)
    (root / "etc/systemd/system/tether-trial-deadline.service").write_text(TRIAL_DEADLINE_UNIT)
    in_chroot(root, ["systemctl", "enable", "tether-trial-deadline.service"], what="enabling tether-trial-deadline")


def _kernel_image(root: Path) -> Path:
    images = sorted((root / "boot").glob("vmlinuz-*"))
    if not images:
        raise BuildError("no kernel in /boot of the base disk: is linux-image-cloud-amd64 in packages.txt?")
    return images[-1]


def _kernel_symlinks(root: Path) -> None:
    """/vmlinuz points at the newest kernel (GRUB boots it, without an initramfs)."""
    kernel = _kernel_image(root)
    path = root / "vmlinuz"
    if path.is_symlink() or path.exists():
        path.unlink()
    path.symlink_to(f"boot/{kernel.name}")


#: initramfs-tools stays installed (the kernel package depends on it), but
#: generates nothing: the appliance boots without an initramfs (bootconf).
INITRAMFS_OFF = """\
# tether: the appliance boots without an initramfs (written by tether.image)
update_initramfs=no
"""


def _drop_initramfs(root: Path) -> None:
    """Remove the initramfs the kernel package made: nothing boots it (15 MB of the OVA)."""
    for initrd in (root / "boot").glob("initrd.img-*"):
        initrd.unlink()
    link = root / "initrd.img"
    if link.is_symlink() or link.exists():
        link.unlink()
    (root / "etc/initramfs-tools/update-initramfs.conf").write_text(INITRAMFS_OFF)


def kernel_has_module(tree: Path, module: str) -> bool:
    """True when `module` is a loadable .ko in `tree` or built into the kernel.

    The Debian cloud kernel builds nvme in (listed in modules.builtin) and
    ships vmxnet3 as a module, so both places count.
    """
    builtin = tree / "modules.builtin"
    if builtin.is_file() and any(
        line.rsplit("/", 1)[-1] == f"{module}.ko" for line in builtin.read_text().splitlines()
    ):
        return True
    return any(tree.rglob(f"{module}.ko*"))


def _check_kernel(root: Path) -> None:
    """The kernel must have the drivers the OVF (NVMe, vmxnet3) declares."""
    trees = sorted((root / "usr/lib/modules").glob("*"))
    if not trees:
        raise BuildError("no /lib/modules in the base disk")
    missing = [m for m in REQUIRED_MODULES if not kernel_has_module(trees[-1], m)]
    if missing:
        raise BuildError(f"kernel {trees[-1].name} lacks modules {missing}: use linux-image-cloud-amd64")


if __name__ == "__main__":  # manual use: python -m tether.image.basedisk CACHE_DIR
    result = ensure(Path(sys.argv[1]), default_inputs())
    print(result)
