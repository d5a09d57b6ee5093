"""Partition layout of the appliance disk (docs/CONTRACTS.md, "Disk layout").

Plain arithmetic, no I/O, so the layout is unit tested and its description
feeds the base disk's cache key: change a size here and the base is rebuilt.

GPT, 16 GiB: bios-grub (GRUB core for BIOS boot), a small boot partition
outside both slots (grub.cfg, grubenv and GRUB's modules, mounted on
/boot/grub: an update can rewrite either slot and both can read and write the
boot state), two equal root slots A/B
(B reserved for RAUC whole-image updates), a data partition that survives a
slot switch, and 4 GiB swap at the end. Partitions are found by label only.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024
GIB = 1024 * MIB
SECTOR = 512

# GPT partition type GUIDs (UEFI spec / freedesktop discoverable partitions).
TYPE_BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
TYPE_LINUX_FS = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
TYPE_SWAP = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"

# The primary GPT lives in the first MiB; the backup GPT needs 33 sectors at
# the very end, so the last MiB is kept free as well (1 MiB alignment).
_ALIGN = MIB
_HEAD = 1 * MIB
_TAIL = 1 * MIB


class LayoutError(ValueError):
    """The requested sizes do not fit the disk or break a minimum."""


@dataclass(frozen=True)
class Partition:
    """One GPT partition: its label is also its filesystem label."""

    number: int
    label: str
    type_guid: str
    fs: str | None  # "ext4", "swap" or None (raw, bios-grub)
    start: int  # bytes
    size: int  # bytes

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class Layout:
    disk_size: int
    partitions: tuple[Partition, ...]

    def by_label(self, label: str) -> Partition:
        for part in self.partitions:
            if part.label == label:
                return part
        raise KeyError(label)

    def sfdisk_script(self) -> str:
        """Input for `sfdisk` that writes exactly this table (sectors)."""
        lines = ["label: gpt", "unit: sectors", ""]
        for p in self.partitions:
            lines.append(
                f"start={p.start // SECTOR}, size={p.size // SECTOR}, "
                f'type={p.type_guid}, name="{p.label}"'
            )
        return "\n".join(lines) + "\n"

    def describe(self) -> str:
        """Stable text of the layout: part of the base disk's cache key."""
        rows = [f"disk {self.disk_size}"]
        rows += [f"{p.number} {p.label} {p.type_guid} {p.fs} {p.start} {p.size}" for p in self.partitions]
        return "\n".join(rows)


def _aligned(value: int) -> bool:
    return value % _ALIGN == 0


def plan(
    disk_size: int = 16 * GIB,
    swap_size: int = 4 * GIB,
    slot_size: int = 4 * GIB,
    bios_grub_size: int = 1 * MIB,
    boot_size: int = 64 * MIB,
    min_data_size: int = 1 * GIB,
) -> Layout:
    """Lay out the disk; the data partition takes whatever the others leave.

    Slots of 4 GiB hold the OS (about 1 GiB after provisioning) with room to
    grow; every size is MiB-aligned so the partitions sit on any sector size.
    """
    for name, value in (("disk", disk_size), ("swap", swap_size), ("slot", slot_size), ("bios-grub", bios_grub_size),
                        ("boot", boot_size)):
        if value <= 0 or not _aligned(value):
            raise LayoutError(f"{name} size {value} must be a positive multiple of 1 MiB")
    if slot_size < 2 * GIB:
        raise LayoutError(f"root slot of {slot_size // MIB} MiB is too small for the OS: give at least 2048 MiB")
    data_size = disk_size - _HEAD - _TAIL - bios_grub_size - boot_size - 2 * slot_size - swap_size
    if data_size < min_data_size:
        raise LayoutError(
            f"disk of {disk_size // MIB} MiB leaves {max(data_size, 0) // MIB} MiB for data "
            f"(need {min_data_size // MIB} MiB): use a bigger disk or smaller slots/swap"
        )
    specs = [
        ("bios-grub", TYPE_BIOS_BOOT, None, bios_grub_size),
        ("boot", TYPE_LINUX_FS, "ext4", boot_size),
        ("root-a", TYPE_LINUX_FS, "ext4", slot_size),
        ("root-b", TYPE_LINUX_FS, "ext4", slot_size),
        ("data", TYPE_LINUX_FS, "ext4", data_size),
        ("swap", TYPE_SWAP, "swap", swap_size),
    ]
    parts = []
    offset = _HEAD
    for number, (label, guid, fs, size) in enumerate(specs, start=1):
        parts.append(Partition(number, label, guid, fs, offset, size))
        offset += size
    return Layout(disk_size, tuple(parts))
