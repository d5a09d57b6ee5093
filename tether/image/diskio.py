"""Loop devices, mounts and chroot bind mounts that always clean up.

The base disk and the per-build disk are edited on the host through a loop
device. Every helper is a context manager, so a failure half-way (a bad
package, Ctrl-C) still unmounts and detaches: a leaked loop device or mount
would break the next build and other users of the machine.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import subprocess
import time
from pathlib import Path
from typing import Iterator

from .errors import BuildError
from .proc import run


class LoopDisk:
    """A raw disk image attached to a loop device with its partitions."""

    def __init__(self, device: str):
        self.device = device

    @property
    def name(self) -> str:
        return Path(self.device).name

    def partition(self, number: int) -> str:
        return f"{self.device}p{number}"


def _sys_partitions(name: str) -> list[Path]:
    return sorted(Path("/sys/block", name).glob(f"{name}p*"))


def _ensure_nodes(disk: LoopDisk, expected: int) -> None:
    """Make sure /dev/loopNpM exist: containers often run without udev.

    losetup --partscan asks the kernel to scan; when it did not (or udev is
    absent), `partx -a` adds the partitions and missing device nodes are made
    from the major:minor the kernel publishes in /sys.
    """
    if len(_sys_partitions(disk.name)) < expected:
        subprocess.run(["partx", "-a", disk.device], capture_output=True)
    deadline = time.monotonic() + 10
    while len(_sys_partitions(disk.name)) < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    parts = _sys_partitions(disk.name)
    if len(parts) < expected:
        raise BuildError(f"{disk.device}: kernel shows {len(parts)} partitions, expected {expected}")
    for sysdir in parts:
        node = Path("/dev", sysdir.name)
        major, minor = (int(x) for x in (sysdir / "dev").read_text().split(":"))
        if not node.exists():
            os.mknod(node, 0o600 | stat.S_IFBLK, os.makedev(major, minor))


@contextlib.contextmanager
def attached(image: Path, partitions: int, read_only: bool = False) -> Iterator[LoopDisk]:
    """Attach `image` with --partscan; detach on exit, also on failure."""
    cmd = ["losetup", "--show", "--find", "--partscan"]
    if read_only:
        cmd.append("--read-only")
    device = run(cmd + [str(image)], what=f"attaching {image} to a loop device").strip()
    disk = LoopDisk(device)
    try:
        _ensure_nodes(disk, partitions)
        yield disk
    finally:
        _detach(disk)


def _detach(disk: LoopDisk) -> None:
    subprocess.run(["sync"])
    for attempt in range(20):
        res = subprocess.run(["losetup", "-d", disk.device], capture_output=True, text=True)
        if res.returncode == 0:
            break
        time.sleep(0.25 * (attempt + 1))
    else:
        raise BuildError(f"could not detach {disk.device}: {res.stderr.strip()}; run `losetup -d {disk.device}`")
    # Nodes made by hand (no udev) do not vanish with the device.
    for node in Path("/dev").glob(f"{disk.name}p*"):
        with contextlib.suppress(OSError):
            node.unlink()


@contextlib.contextmanager
def mounted(source: str, target: Path, options: str | None = None, fstype: str | None = None) -> Iterator[Path]:
    """Mount `source` on `target`; lazy-unmount as a last resort on exit."""
    target.mkdir(parents=True, exist_ok=True)
    cmd = ["mount"]
    if fstype:
        cmd += ["-t", fstype]
    if options:
        cmd += ["-o", options]
    run(cmd + [source, str(target)], what=f"mounting {source} on {target}")
    try:
        yield target
    finally:
        umount(target)


def umount(target: Path) -> None:
    """Unmount, retrying while a just-exited process still holds files."""
    for attempt in range(10):
        res = subprocess.run(["umount", str(target)], capture_output=True, text=True)
        if res.returncode == 0:
            return
        time.sleep(0.2 * (attempt + 1))
    subprocess.run(["umount", "--lazy", str(target)], capture_output=True)


@contextlib.contextmanager
def chroot_mounts(root: Path) -> Iterator[Path]:
    """Bind /dev, /dev/pts, /proc, /sys into `root` for package scripts."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mounted("/dev", root / "dev", options="bind"))
        stack.enter_context(mounted("devpts", root / "dev/pts", fstype="devpts", options="gid=5,mode=620,ptmxmode=666,newinstance"))
        stack.enter_context(mounted("proc", root / "proc", fstype="proc"))
        stack.enter_context(mounted("sysfs", root / "sys", fstype="sysfs"))
        yield root


def in_chroot(root: Path, cmd: list[str], what: str, input: str | None = None) -> str:
    """Run `cmd` inside `root` with a clean, non-interactive environment."""
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "DEBIAN_FRONTEND": "noninteractive",
        "LC_ALL": "C.UTF-8",
        "HOME": "/root",
    }
    return run(["chroot", str(root), "/usr/bin/env", "-i"] + [f"{k}={v}" for k, v in env.items()] + cmd,
               what=what, input=input)


_ZEROS = bytes(1 << 20)


def sha256_sparse(path: Path, chunk: int = 1 << 20) -> str:
    """SHA256 of a (sparse) file; holes are hashed as zeros without reading them.

    SEEK_DATA/SEEK_HOLE find the allocated extents; a 16 GiB raw disk with
    ~1 GiB of data is then hashing-bound (hashlib releases the GIL, so this
    runs in a thread next to other work). File systems without SEEK_DATA
    report the whole file as data: still correct, only slower.
    """
    digest = hashlib.sha256()
    zeros = memoryview(_ZEROS)
    with open(path, "rb") as handle:
        fd = handle.fileno()
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:  # ENXIO: only a hole up to the end
                if exc.errno != errno.ENXIO:
                    raise
                data = size
            while pos < data:  # the hole [pos, data)
                step = min(len(zeros), data - pos)
                digest.update(zeros[:step])
                pos += step
            if pos >= size:
                break
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            handle.seek(pos)
            while pos < hole:
                block = handle.read(min(chunk, hole - pos))
                if not block:
                    raise OSError(f"{path}: short read at {pos}")
                digest.update(block)
                pos += len(block)
    return digest.hexdigest()
