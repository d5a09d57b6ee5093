"""OVA writer: descriptor, manifest, VMDK header and tar order, on a small raw disk."""

from __future__ import annotations

import hashlib
import io
import shutil
import struct
import subprocess
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tether.image import ova, ovf, vmdk

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-utils")

NS = ovf.NS
DISK_BYTES = 8 * 1024 * 1024


def _raw_disk(path: Path) -> Path:
    """A sparse 8 MiB disk with a few non-zero regions (a fake MBR and data)."""
    with open(path, "wb") as handle:
        handle.truncate(DISK_BYTES)
        handle.write(b"\xeb\x63\x90" + b"tether" * 10)
        handle.seek(510)
        handle.write(b"\x55\xaa")
        handle.seek(3 * 1024 * 1024 + 4096)
        handle.write(bytes(range(256)) * 64)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """One OVA built for the module: (raw disk, ova)."""
    base = tmp_path_factory.mktemp("ova")
    raw = _raw_disk(base / "appliance.raw")
    result = ova.build_ova(raw, base / "appliance.ova",
                           ovf.Product("appliance", "1.2.3", "image-uuid-1"), progress=None)
    return raw, result.path


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _descriptor(path: Path) -> ET.Element:
    with tarfile.open(path) as tar:
        first = tar.next()
        return ET.fromstring(tar.extractfile(first).read())


def _items(root: ET.Element) -> list[dict[str, str]]:
    hw = root.find("ovf:VirtualSystem/ovf:VirtualHardwareSection", NS)
    return [{c.tag.split("}")[1]: c.text for c in item} for item in hw.iterfind("ovf:Item", NS)]


def test_tar_order_is_descriptor_manifest_disk(built):
    _, path = built
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["appliance.ovf", "appliance.mf", "appliance-disk1.vmdk"]
    assert all(m.isfile() and m.mode == 0o644 and m.uid == 0 for m in members)
    assert path.read_bytes()[257:262] == b"ustar"


def test_no_temporary_files_left(built):
    _, path = built
    assert sorted(p.name for p in path.parent.iterdir()) == ["appliance.ova", "appliance.raw"]


def test_hardware_items(built):
    root = _descriptor(built[1])
    items = _items(root)
    by_type = {}
    for item in items:
        by_type.setdefault(item["ResourceType"], []).append(item)
    assert [i["VirtualQuantity"] for i in by_type["3"]] == ["4"]
    assert by_type["4"][0]["VirtualQuantity"] == "8192"
    assert by_type["4"][0]["AllocationUnits"] == "byte * 2^20"
    (nvme,) = by_type["20"]
    assert nvme["ResourceSubType"] == "vmware.nvme.controller"
    (disk,) = by_type["17"]
    assert disk["Parent"] == nvme["InstanceID"]
    assert disk["HostResource"] == "ovf:/disk/vmdisk1"
    (nic,) = by_type["10"]
    assert nic["ResourceSubType"] == "VmxNet3"
    assert nic["Connection"] == root.find("ovf:NetworkSection/ovf:Network", NS).get(
        f"{{{NS['ovf']}}}name")
    assert "6" not in by_type, "no SCSI controller: the kernel has no pvscsi/LSI driver"


def test_oldest_vsphere_choice_is_consistent(built):
    root = _descriptor(built[1])
    vs = root.find("ovf:VirtualSystem", NS)
    system_type = vs.findtext("ovf:VirtualHardwareSection/ovf:System/vssd:VirtualSystemType",
                              namespaces=NS)
    assert system_type == "vmx-13" == ovf.MIN_VSPHERE.hardware
    os_section = vs.find("ovf:OperatingSystemSection", NS)
    assert os_section.get(f"{{{NS['vmw']}}}osType") == "debian10_64Guest"
    assert os_section.get(f"{{{NS['ovf']}}}id") == "96"
    assert ovf.MIN_VSPHERE.esxi == "6.5"


def test_transport_and_properties(built):
    root = _descriptor(built[1])
    hw = root.find("ovf:VirtualSystem/ovf:VirtualHardwareSection", NS)
    assert hw.get(f"{{{NS['ovf']}}}transport") == "com.vmware.guestInfo iso"
    props = {p.get(f"{{{NS['ovf']}}}key"): p for p in
             root.iterfind("ovf:VirtualSystem/ovf:ProductSection/ovf:Property", NS)}
    for key in ("hostname", "network.mode", "network.address", "network.prefix",
                "network.gateway", "network.dns", "network.ntp", "proxy.url", "home.url"):
        assert props[key].get(f"{{{NS['ovf']}}}userConfigurable") == "true", key
        assert props[key].findtext("ovf:Label", namespaces=NS)
    mode = props["network.mode"]
    assert mode.get(f"{{{NS['ovf']}}}value") == "dhcp"
    assert mode.get(f"{{{NS['ovf']}}}qualifiers") == 'ValueMap{"dhcp","static"}'
    assert props["image.id"].get(f"{{{NS['ovf']}}}value") == "image-uuid-1"
    assert props["image.id"].get(f"{{{NS['ovf']}}}userConfigurable") == "false"


def test_references_and_disk_section(built):
    raw, path = built
    members = _members(path)
    root = ET.fromstring(members["appliance.ovf"])
    ref = root.find("ovf:References/ovf:File", NS)
    assert ref.get(f"{{{NS['ovf']}}}href") == "appliance-disk1.vmdk"
    assert int(ref.get(f"{{{NS['ovf']}}}size")) == len(members["appliance-disk1.vmdk"])
    disk = root.find("ovf:DiskSection/ovf:Disk", NS)
    assert int(disk.get(f"{{{NS['ovf']}}}capacity")) == DISK_BYTES
    assert disk.get(f"{{{NS['ovf']}}}format").endswith("#streamOptimized")


def test_manifest_lists_sha256_of_every_file(built):
    members = _members(built[1])
    lines = members["appliance.mf"].decode().splitlines()
    expected = [f"SHA256({name})= {hashlib.sha256(members[name]).hexdigest()}"
                for name in ("appliance.ovf", "appliance-disk1.vmdk")]
    assert lines == expected


def test_vmdk_header_is_stream_optimized_version3(built):
    data = _members(built[1])["appliance-disk1.vmdk"]
    magic, version, flags, capacity = struct.unpack_from("<4sIIQ", data)
    assert magic == b"KDMV"
    assert version == 3
    assert flags & (1 << 16) and flags & (1 << 17)  # compressed grains, markers
    assert capacity * 512 == DISK_BYTES
    assert b'createType="streamOptimized"' in data[512:4096]


def test_vmdk_holds_the_same_disk(built, tmp_path):
    raw, path = built
    disk = tmp_path / "disk.vmdk"
    disk.write_bytes(_members(path)["appliance-disk1.vmdk"])
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "vmdk", str(raw), str(disk)],
                   check=True, capture_output=True)


def test_verify_accepts_good_ova(built):
    assert ova.verify_ova(built[1]) == []


def _rewrite(path: Path, out: Path, members: dict[str, bytes], order: list[str]) -> Path:
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in order:
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            tar.addfile(info, io.BytesIO(members[name]))
    return out


def test_verify_detects_corrupt_disk(built, tmp_path):
    members = _members(built[1])
    vmdk_bytes = bytearray(members["appliance-disk1.vmdk"])
    vmdk_bytes[-100] ^= 0xFF
    members["appliance-disk1.vmdk"] = bytes(vmdk_bytes)
    bad = _rewrite(built[1], tmp_path / "bad.ova", members, list(members))
    problems = ova.verify_ova(bad)
    assert len(problems) == 1
    assert "SHA256 of appliance-disk1.vmdk" in problems[0] and "corrupt" in problems[0]


def test_verify_detects_wrong_order_and_missing_digest(built, tmp_path):
    members = _members(built[1])
    members["appliance.mf"] = members["appliance.mf"].splitlines(keepends=True)[1]
    bad = _rewrite(built[1], tmp_path / "bad.ova", members,
                   ["appliance-disk1.vmdk", "appliance.ovf", "appliance.mf"])
    problems = ova.verify_ova(bad)
    assert any("first member must be the .ovf" in p for p in problems)
    assert any("second member must be the .mf" in p for p in problems)
    assert any("appliance.ovf has no SHA256 line" in p for p in problems)


def test_verify_detects_old_vmdk_version_and_wrong_hardware(built, tmp_path):
    members = _members(built[1])
    disk = bytearray(members["appliance-disk1.vmdk"])
    disk[4:8] = struct.pack("<I", 1)
    members["appliance-disk1.vmdk"] = bytes(disk)
    members["appliance.ovf"] = members["appliance.ovf"].replace(
        b"vmware.nvme.controller", b"lsilogic").replace(b"<rasd:VirtualQuantity>4<",
                                                        b"<rasd:VirtualQuantity>2<")
    digests = {n: hashlib.sha256(members[n]).hexdigest()
               for n in ("appliance.ovf", "appliance-disk1.vmdk")}
    members["appliance.mf"] = ova.manifest_text(digests).encode()
    bad = _rewrite(built[1], tmp_path / "bad.ova", members, list(members))
    problems = ova.verify_ova(bad)
    assert any("header version 1" in p for p in problems)
    assert any("disk controllers" in p for p in problems)
    assert any("vCPUs" in p for p in problems)


def test_verify_reports_unreadable_file(tmp_path):
    junk = tmp_path / "junk.ova"
    junk.write_bytes(b"not a tar" * 100)
    (problem,) = ova.verify_ova(junk)
    assert "not a readable OVA" in problem


def test_version1_header_is_patched(built, tmp_path):
    disk = tmp_path / "old.vmdk"
    data = bytearray(_members(built[1])["appliance-disk1.vmdk"])
    data[4:8] = struct.pack("<I", 1)
    disk.write_bytes(bytes(data))
    assert vmdk.read_header(disk).version == 1
    assert vmdk.ensure_version3(disk) is True
    assert vmdk.read_header(disk).version == 3
    assert vmdk.ensure_version3(disk) is False


def test_bad_input_gives_clear_error_and_no_output(tmp_path, monkeypatch):
    with pytest.raises(ova.OvaError, match="make image"):
        ova.build_ova(tmp_path / "missing.raw", tmp_path / "x.ova", ovf.Product("x", "1"))
    raw = _raw_disk(tmp_path / "a.raw")

    def broken(*_args, **_kwargs):
        raise vmdk.VmdkError("disk full")

    monkeypatch.setattr(vmdk, "convert", broken)
    with pytest.raises(vmdk.VmdkError):
        ova.build_ova(raw, tmp_path / "a.ova", ovf.Product("a", "1"), progress=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.raw"]


def test_progress_is_reported(tmp_path):
    raw = _raw_disk(tmp_path / "p.raw")
    out = io.StringIO()
    ova.build_ova(raw, tmp_path / "p.ova", ovf.Product("p", "1"), progress=out)
    text = out.getvalue()
    assert "converting p.raw" in text and "100.00/100%" in text and "wrote" in text


def test_ova_disk_compared_with_raw_in_place(built, tmp_path):
    raw, path = built
    assert ova.compare_disk(path, raw) == []
    changed = tmp_path / "changed.raw"
    shutil.copy(raw, changed)
    with open(changed, "r+b") as handle:
        handle.seek(5 * 1024 * 1024)
        handle.write(b"different")
    (problem,) = ova.compare_disk(path, changed)
    assert "differs from changed.raw" in problem
