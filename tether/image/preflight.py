"""Checks before a build touches anything: root, free disk, writable images/.

Each failure names the problem and the fix; finding it after ten minutes of
debootstrap and TCG boot would waste the whole build.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import BuildError
from .proc import require

#: Base disk (~1.5 GiB real), per-build copy and Packer's output (sparse,
#: ~2 GiB each), OVA (~0.3 GiB), raw artifact, debootstrap cache: 8 GiB is
#: what a cold build actually needs with margin.
MIN_FREE_BYTES = 8 * 1024**3

#: Host tools the pipeline runs, with the Debian package that provides them.
TOOLS = {
    "packer": "packer",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "debootstrap": "debootstrap",
    "sfdisk": "fdisk",
    "losetup": "mount",
    "mkfs.ext4": "e2fsprogs",
    "ssh-keygen": "openssh-client",
}


def check_root() -> None:
    if os.geteuid() != 0:
        raise BuildError("the image build needs root (loop devices, mount, chroot): run it as root, e.g. `sudo make image`")


def check_writable(images_dir: Path) -> None:
    try:
        images_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=images_dir, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise BuildError(f"{images_dir} is not writable ({exc.strerror}): fix its permissions or mount, "
                         "or remove it so the build can create it") from exc


def check_free_space(images_dir: Path, needed: int = MIN_FREE_BYTES) -> None:
    free = shutil.disk_usage(images_dir).free
    if free < needed:
        raise BuildError(
            f"only {free / 1024**3:.1f} GiB free on the filesystem of {images_dir}; a build needs "
            f"{needed / 1024**3:.0f} GiB: delete old images (images/<name>/) or images/.cache/"
        )


def check_tools() -> None:
    for tool, package in TOOLS.items():
        require(tool, package)


def run_all(images_dir: Path) -> None:
    check_root()
    check_writable(images_dir)
    check_free_space(images_dir)
    check_tools()
