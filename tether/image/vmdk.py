"""streamOptimized VMDK: make one from a raw disk and check its header.

An OVA carries its disk as a *streamOptimized* VMDK (compressed grains with
markers) so vCenter can import it while it streams in. VMware's readers want
that kind of VMDK with sparse header *version 3*; qemu-img 7.2 (Debian 12)
already writes 3, older qemu-img wrote 1 for the same layout. When the header
says 1 or 2 we patch the version field (offset 4, and the footer copy if the
file has one) to 3, as open-vmdk/image-builder era scripts did with
`dd conv=notrunc`: the grain layout qemu writes is the version-3 layout, only
the number was behind.
"""

from __future__ import annotations

import os
import re
import struct
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from tether.image.errors import BuildError

SECTOR = 512
MAGIC = 0x564D444B  # "KDMV" little endian
STREAM_VERSION = 3
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
COMPRESS_DEFLATE = 1
# SparseExtentHeader up to compressAlgorithm (VMDK spec 5.0, "Hosted Sparse
# Extent Header"): magic, version, flags, capacity, grainSize,
# descriptorOffset, descriptorSize, numGTEsPerGT, rgdOffset, gdOffset,
# overHead, uncleanShutdown, 4 newline-check chars, compressAlgorithm.
_HEADER = struct.Struct("<IIIQQQQIQQQB4sH")
# Virtual hardware version written into the descriptor's DDB; matches the
# OVF's vmx-13 (see tether.image.ovf.MIN_ESXI).
DDB_HW_VERSION = "13"


class VmdkError(BuildError):
    """The VMDK could not be produced or is not a usable streamOptimized disk."""


@dataclass(frozen=True)
class VmdkHeader:
    """The fields of the sparse extent header that matter to VMware importers."""

    version: int
    flags: int
    capacity_sectors: int
    grain_sectors: int
    compress_algorithm: int
    descriptor: str

    @property
    def capacity_bytes(self) -> int:
        return self.capacity_sectors * SECTOR

    @property
    def create_type(self) -> str | None:
        match = re.search(r'createType\s*=\s*"([^"]+)"', self.descriptor)
        return match.group(1) if match else None


def parse_header(head: bytes) -> VmdkHeader:
    """Decode the first sectors of a sparse VMDK (header + embedded descriptor).

    `head` must hold at least the header sector; the descriptor is decoded from
    it when the caller passed enough bytes (the first 64 KiB always suffice).
    """
    if len(head) < _HEADER.size:
        raise VmdkError(f"VMDK too short: {len(head)} bytes, a sparse header needs {SECTOR}")
    (magic, version, flags, capacity, grain, desc_off, desc_size, _gtes,
     _rgd, _gd, _over, _unclean, _nl, compress) = _HEADER.unpack_from(head)
    if magic != MAGIC:
        raise VmdkError(f"not a sparse VMDK: magic {magic:#010x}, expected 'KDMV'")
    start, end = desc_off * SECTOR, (desc_off + desc_size) * SECTOR
    descriptor = head[start:end].split(b"\0", 1)[0].decode("ascii", "replace")
    return VmdkHeader(version, flags, capacity, grain, compress, descriptor)


def read_header(path: Path) -> VmdkHeader:
    """Read and decode the header of the VMDK file at `path`."""
    with open(path, "rb") as handle:
        return parse_header(handle.read(64 * 1024))


def header_problems(header: VmdkHeader, capacity_bytes: int | None = None) -> list[str]:
    """List what keeps this header from being a VMware-importable streamOptimized disk."""
    problems = []
    if header.version != STREAM_VERSION:
        problems.append(f"VMDK header version {header.version}, VMware wants {STREAM_VERSION}")
    if not header.flags & FLAG_COMPRESSED or not header.flags & FLAG_MARKERS:
        problems.append(f"VMDK flags {header.flags:#x} lack compressed grains with markers")
    if header.compress_algorithm != COMPRESS_DEFLATE:
        problems.append(f"VMDK compression {header.compress_algorithm}, expected 1 (deflate)")
    if header.create_type != "streamOptimized":
        problems.append(f"VMDK createType {header.create_type!r}, expected 'streamOptimized'")
    if capacity_bytes is not None and header.capacity_bytes != capacity_bytes:
        problems.append(f"VMDK capacity {header.capacity_bytes} bytes, expected {capacity_bytes}")
    return problems


def ensure_version3(path: Path) -> bool:
    """Patch a version 1/2 streamOptimized header to 3 in place; True if patched.

    Both the header at offset 0 and the footer copy (second-to-last sector,
    present when the grain directory is at the end) carry the version.
    """
    header = read_header(path)
    if header.version == STREAM_VERSION:
        return False
    if header.version not in (1, 2) or header.create_type != "streamOptimized":
        raise VmdkError(f"{path}: VMDK version {header.version} / {header.create_type}: "
                        "not a qemu streamOptimized disk, will not patch")
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        for offset in (0, size - 2 * SECTOR):
            handle.seek(offset)
            if offset >= 0 and struct.unpack("<I", handle.read(4))[0] == MAGIC:
                handle.seek(offset + 4)
                handle.write(struct.pack("<I", STREAM_VERSION))
    return True


def convert(raw: Path, out: Path, progress: TextIO | None = sys.stderr) -> VmdkHeader:
    """Convert a raw disk to a streamOptimized VMDK at `out` and check its header.

    Writes to `out` under a temporary name and renames at the end, so a
    crashed conversion never leaves a file that looks finished.
    """
    # Same file name inside a scratch directory: qemu-img records the file's
    # own name in the embedded descriptor's extent line.
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    tmp = scratch / out.name
    cmd = ["qemu-img", "convert", "-f", "raw", "-O", "vmdk",
           "-o", f"subformat=streamOptimized,hwversion={DDB_HW_VERSION}"]
    if progress is not None:
        cmd.append("-p")
    cmd += [str(raw), str(tmp)]
    try:
        _run_qemu_img(cmd, progress)
        ensure_version3(tmp)
        header = read_header(tmp)
        problems = header_problems(header, raw.stat().st_size)
        if problems:
            raise VmdkError(f"{out}: " + "; ".join(problems))
        os.replace(tmp, out)
        return header
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run_qemu_img(cmd: list[str], progress: TextIO | None) -> None:
    """Run qemu-img, forwarding its `-p` progress; raise with its last output on failure."""
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except FileNotFoundError:
        raise VmdkError("qemu-img not found: install qemu-utils (apt-get install qemu-utils)") from None
    tail = b""
    assert proc.stdout is not None
    with proc.stdout:
        for chunk in iter(lambda: proc.stdout.read1(256), b""):
            tail = (tail + chunk)[-2000:]
            if progress is not None:
                progress.write(chunk.decode("utf-8", "replace"))
                progress.flush()
    if proc.wait() != 0:
        message = tail.decode("utf-8", "replace").strip().splitlines()
        raise VmdkError(f"qemu-img convert failed ({proc.returncode}): "
                        f"{message[-1] if message else 'no output'}; "
                        "check free space and that the raw disk is readable")
    if progress is not None:
        progress.write("\n")
