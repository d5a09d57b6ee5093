"""The appliance OVA: assemble it from a raw disk, and check one.

An OVA is a USTAR tar whose first member is the OVF descriptor, then the
manifest (.mf, one `SHA256(name)= hex` line per other file), then the disk.
vCenter reads it front to back while it streams, which is why the order is
fixed and the disk is a streamOptimized VMDK (see `tether.image.vmdk`).

`verify_ova` is what the image verification and the tests use: it returns the
list of problems (empty means good) instead of stopping at the first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TextIO

from tether.image import ovf, vmdk
from tether.image.errors import BuildError

CHUNK = 1024 * 1024
_MF_LINE = re.compile(r"^SHA256\(([^)]+)\)= ([0-9a-f]{64})$")


class OvaError(BuildError):
    """The OVA could not be built; the message says what to do."""


@dataclass(frozen=True)
class OvaResult:
    """What `build_ova` produced."""

    path: Path
    size: int
    vmdk_size: int
    sha256: str


# ------------------------------------------------------------------ hashing


def sha256_stream(stream: BinaryIO, total: int, label: str, progress: TextIO | None,
                  digest: "hashlib._Hash | None" = None, done: int = 0) -> str:
    """SHA256 of a stream, printing `label: NN%` every 10% when `progress` is given.

    `digest`/`done` continue a hash whose first `done` bytes the caller
    already fed (the VMDK header is read separately to be parsed).
    """
    digest = digest or hashlib.sha256()
    shown = -1
    for chunk in iter(lambda: stream.read(CHUNK), b""):
        digest.update(chunk)
        done += len(chunk)
        step = done * 10 // total if total else 10
        if progress is not None and step != shown and total >= 64 * CHUNK:
            shown = step
            progress.write(f"  {label}: {step * 10}%\n")
            progress.flush()
    return digest.hexdigest()


def sha256_file(path: Path, progress: TextIO | None = None) -> str:
    """SHA256 hex of a file; progress lines for large files."""
    with open(path, "rb") as handle:
        return sha256_stream(handle, path.stat().st_size, f"sha256 {path.name}", progress)


def manifest_text(digests: dict[str, str]) -> str:
    """The .mf body: `SHA256(name)= hex` lines, in the given order."""
    return "".join(f"SHA256({name})= {hexdigest}\n" for name, hexdigest in digests.items())


def allocated_bytes(path: Path) -> int:
    """Bytes the (sparse) file really occupies: the OVF's populatedSize."""
    return min(path.stat().st_blocks * 512, path.stat().st_size)


# ------------------------------------------------------------------ building


def build_ova(raw: Path, out: Path, product: ovf.Product, hw: ovf.Hardware = ovf.Hardware(),
              progress: TextIO | None = sys.stderr) -> OvaResult:
    """Build `out` (name.ova) from the raw disk `raw`; temp names until the final rename."""
    raw, out = Path(raw), Path(out)
    _check_inputs(raw, out)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        stem = out.name.removesuffix(".ova")
        disk = scratch / f"{stem}-disk1.vmdk"
        _say(progress, f"ova: converting {raw.name} to streamOptimized VMDK")
        started = time.monotonic()
        vmdk.convert(raw, disk, progress)
        _say(progress, f"ova: VMDK {disk.stat().st_size / 2**20:.1f} MiB "
                       f"in {time.monotonic() - started:.1f} s")
        descriptor = ovf.build_descriptor(
            ovf.DiskRef(disk.name, disk.stat().st_size, raw.stat().st_size,
                        allocated_bytes(raw)), product, hw)
        ovf_path = scratch / f"{stem}.ovf"
        ovf_path.write_bytes(descriptor)
        digests = {ovf_path.name: sha256_file(ovf_path),
                   disk.name: sha256_file(disk, progress)}
        mf_path = scratch / f"{stem}.mf"
        mf_path.write_text(manifest_text(digests))
        tmp = scratch / out.name
        _say(progress, f"ova: packing {ovf_path.name}, {mf_path.name}, {disk.name}")
        _write_tar(tmp, [ovf_path, mf_path, disk])
        os.replace(tmp, out)
        _say(progress, f"ova: wrote {out}")
        return OvaResult(out, out.stat().st_size, disk.stat().st_size, sha256_file(out, progress))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _check_inputs(raw: Path, out: Path) -> None:
    if not raw.is_file():
        raise OvaError(f"raw disk {raw} not found: build the image first (make image)")
    if raw.stat().st_size % vmdk.SECTOR:
        raise OvaError(f"raw disk {raw} is {raw.stat().st_size} bytes, not a multiple of 512: "
                       "not a disk image")
    if out.suffix != ".ova":
        raise OvaError(f"output {out} must end in .ova")
    if len(out.name) > 80 or "/" in out.stem:
        raise OvaError(f"image name {out.stem!r} is too long for an OVA member name "
                       "(USTAR: 100 characters): choose a NAME of at most 70 characters")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise OvaError(f"cannot write to {out.parent}: create it or fix its permissions")


def _write_tar(path: Path, members: list[Path]) -> None:
    """USTAR tar (what OVF 1.x requires), members in the order given, root-owned 0644."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member in members:
            info = tar.gettarinfo(str(member), arcname=member.name)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mode = 0o644
            with open(member, "rb") as handle:
                tar.addfile(info, handle)


def _say(progress: TextIO | None, line: str) -> None:
    if progress is not None:
        progress.write(line + "\n")
        progress.flush()


# ------------------------------------------------------------------ reading back


@dataclass
class OvaContents:
    """An OVA read back: member order and sizes, descriptor, manifest, digests."""

    names: list[str] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
    descriptor: bytes = b""
    manifest: str = ""
    vmdk_headers: dict[str, vmdk.VmdkHeader | str] = field(default_factory=dict)


def read_ova(path: Path, progress: TextIO | None = None) -> OvaContents:
    """Read every member once: keep the small text files, hash everything.

    Raises OvaError if the file is not a readable tar at all.
    """
    contents = OvaContents()
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                _read_member(tar, info, contents, progress)
    except (tarfile.TarError, OSError) as exc:
        raise OvaError(f"{path}: not a readable OVA (tar): {exc}") from None
    return contents


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo, contents: OvaContents,
                 progress: TextIO | None) -> None:
    contents.names.append(info.name)
    contents.sizes[info.name] = info.size
    stream = tar.extractfile(info)
    if stream is None:
        contents.digests[info.name] = ""
        return
    if info.name.endswith((".ovf", ".mf")):
        data = stream.read()
        contents.digests[info.name] = hashlib.sha256(data).hexdigest()
        if info.name.endswith(".ovf"):
            contents.descriptor = data
        else:
            contents.manifest = data.decode("utf-8", "replace")
        return
    head = stream.read(64 * 1024)
    if info.name.endswith(".vmdk"):
        try:
            contents.vmdk_headers[info.name] = vmdk.parse_header(head)
        except vmdk.VmdkError as exc:
            contents.vmdk_headers[info.name] = str(exc)
    contents.digests[info.name] = sha256_stream(
        stream, info.size, f"verify {info.name}", progress, hashlib.sha256(head), len(head))


def verify_ova(path: Path, expect: ovf.Hardware | None = ovf.Hardware(),
               target: ovf.VsphereTarget = ovf.MIN_VSPHERE,
               progress: TextIO | None = None) -> list[str]:
    """Check an OVA; return the problems found (empty list = good).

    Checks member order, every .mf digest, the descriptor's references, the
    VMDK header, and (unless `expect` is None) the declared hardware.
    """
    try:
        contents = read_ova(Path(path), progress)
    except OvaError as exc:
        return [str(exc)]
    problems = _order_problems(contents)
    problems += _manifest_problems(contents)
    if not contents.descriptor:
        return problems + ["no OVF descriptor to check"]
    try:
        summary = ovf.parse_descriptor(contents.descriptor)
    except ValueError as exc:
        return problems + [str(exc)]
    problems += _reference_problems(contents, summary)
    if expect is not None:
        problems += hardware_problems(summary, expect, target)
    return problems


def compare_disk(ova_path: Path, raw: Path) -> list[str]:
    """Check that the OVA's VMDK holds exactly the raw disk (the one AWS gets).

    qemu-img reads the VMDK in place inside the tar (raw driver with an
    offset), so nothing is extracted. Returns problems; empty means identical.
    """
    with tarfile.open(ova_path, "r:") as tar:
        disks = [m for m in tar.getmembers() if m.name.endswith(".vmdk")]
    if len(disks) != 1:
        return [f"{ova_path}: expected one .vmdk, found {[m.name for m in disks]}"]
    spec = {"driver": "vmdk", "file": {"driver": "raw", "offset": disks[0].offset_data,
                                       "size": disks[0].size,
                                       "file": {"driver": "file", "filename": str(ova_path)}}}
    try:
        proc = subprocess.run(["qemu-img", "compare", "-f", "raw", str(raw),
                               "json:" + json.dumps(spec)],
                              capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return ["qemu-img not found: install qemu-utils to compare the OVA's disk"]
    if proc.returncode == 0:
        return []
    detail = (proc.stdout + proc.stderr).strip().splitlines()
    what = "differs from" if proc.returncode == 1 else "could not be compared with"
    return [f"{disks[0].name} in {ova_path.name} {what} {raw.name}: "
            f"{detail[-1] if detail else 'no detail'}"]


def _order_problems(contents: OvaContents) -> list[str]:
    names = contents.names
    problems = []
    if not names or not names[0].endswith(".ovf"):
        problems.append(f"first member must be the .ovf descriptor, found {names[:1]}")
    if len(names) < 2 or not names[1].endswith(".mf"):
        problems.append(f"second member must be the .mf manifest, found {names[1:2]}")
    for name in names:
        if "/" in name or name.startswith("."):
            problems.append(f"member {name!r}: OVA members must be plain file names")
    if len(set(names)) != len(names):
        problems.append(f"duplicate members: {names}")
    return problems


def _manifest_problems(contents: OvaContents) -> list[str]:
    if not contents.manifest:
        return ["no .mf manifest: digests cannot be checked"]
    problems, listed = [], {}
    for number, line in enumerate(contents.manifest.splitlines(), 1):
        match = _MF_LINE.match(line.strip())
        if not match:
            problems.append(f".mf line {number} is not 'SHA256(name)= <64 hex>': {line!r}")
            continue
        listed[match.group(1)] = match.group(2)
    for name, expected in listed.items():
        actual = contents.digests.get(name)
        if actual is None:
            problems.append(f".mf lists {name}, which is not in the OVA")
        elif actual != expected:
            problems.append(f"SHA256 of {name} is {actual}, .mf says {expected}: file corrupt")
    for name in contents.names:
        if not name.endswith(".mf") and name not in listed:
            problems.append(f"{name} has no SHA256 line in the .mf")
    return problems


def _reference_problems(contents: OvaContents, summary: ovf.OvfSummary) -> list[str]:
    problems = []
    for href, size in summary.files.items():
        if href not in contents.sizes:
            problems.append(f"descriptor references {href}, which is not in the OVA")
        elif contents.sizes[href] != size:
            problems.append(f"{href} is {contents.sizes[href]} bytes, descriptor says {size}")
    capacity = {d.get("fileRef"): int(d.get("capacity", "0")) for d in summary.disks}
    file_ids = {href: f"file{i}" for i, href in enumerate(summary.files, 1)}
    for name, header in contents.vmdk_headers.items():
        if isinstance(header, str):
            problems.append(f"{name}: {header}")
            continue
        expected = capacity.get(file_ids.get(name)) if len(capacity) == 1 else None
        problems += [f"{name}: {p}" for p in vmdk.header_problems(header, expected)]
    if not contents.vmdk_headers:
        problems.append("no .vmdk disk in the OVA")
    return problems


def hardware_problems(summary: ovf.OvfSummary, expect: ovf.Hardware,
                      target: ovf.VsphereTarget = ovf.MIN_VSPHERE) -> list[str]:
    """Compare what the descriptor declares with the appliance's hardware contract."""
    problems = []

    def want(what: str, actual: object, expected: object) -> None:
        if actual != expected:
            problems.append(f"descriptor {what} is {actual!r}, expected {expected!r}")

    want("hardware version", summary.hardware, target.hardware)
    want("guest OS", summary.guest_os, target.guest_os)
    want("transport", summary.transport, ovf.OVF_TRANSPORT)
    want("vCPUs", [i.get("VirtualQuantity") for i in summary.items_of(ovf.RT_CPU)],
         [str(expect.cpus)])
    want("memory MB", [i.get("VirtualQuantity") for i in summary.items_of(ovf.RT_MEMORY)],
         [str(expect.memory_mb)])
    want("NICs", [i.get("ResourceSubType") for i in summary.items_of(ovf.RT_NIC)], [target.nic])
    controllers = {i["InstanceID"]: i.get("ResourceSubType", "")
                   for i in summary.items if i.get("ResourceType") in ("5", "6", "20")}
    disk_buses = [controllers.get(i.get("Parent", ""), "none")
                  for i in summary.items_of(ovf.RT_DISK)]
    want("disk controllers", disk_buses, [target.controller])
    missing = [p.key for p in ovf.PROPERTIES if p.key not in summary.properties]
    if missing:
        problems.append(f"descriptor lacks properties {missing}")
    return problems


def main(argv: list[str] | None = None) -> int:
    """`python -m tether.image.ova verify FILE.ova`: print problems, exit 1 if any."""
    parser = argparse.ArgumentParser(prog="python -m tether.image.ova")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("verify", help="check an OVA's order, digests, disk and hardware")
    check.add_argument("ova", type=Path)
    args = parser.parse_args(argv)
    problems = verify_ova(args.ova, progress=sys.stderr)
    for problem in problems:
        print(f"FAIL {problem}")
    print(f"{args.ova}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
