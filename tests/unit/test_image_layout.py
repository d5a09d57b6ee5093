"""Partition layout arithmetic and the boot/mount files derived from it."""

import pytest

from tether.image import bootconf, layout
from tether.image.layout import GIB, MIB, LayoutError


def test_default_layout_matches_the_contract():
    lay = layout.plan()
    assert [p.label for p in lay.partitions] == ["bios-grub", "boot", "root-a", "root-b", "data", "swap"]
    assert lay.disk_size == 16 * GIB
    assert lay.by_label("swap").size == 4 * GIB
    assert lay.by_label("root-a").size == lay.by_label("root-b").size == 4 * GIB
    assert lay.by_label("bios-grub").type_guid == layout.TYPE_BIOS_BOOT
    assert lay.by_label("swap").type_guid == layout.TYPE_SWAP


def test_partitions_are_contiguous_aligned_and_inside_the_disk():
    lay = layout.plan()
    prev_end = MIB  # primary GPT
    for part in lay.partitions:
        assert part.start == prev_end
        assert part.start % MIB == 0 and part.size % MIB == 0
        prev_end = part.end
    assert prev_end <= lay.disk_size - 33 * 512  # room for the backup GPT


def test_data_takes_what_is_left():
    lay = layout.plan()
    used = sum(p.size for p in lay.partitions if p.label != "data")
    assert lay.by_label("data").size == lay.disk_size - used - 2 * MIB


def test_bigger_disk_grows_data_only():
    small, big = layout.plan(), layout.plan(disk_size=32 * GIB)
    assert big.by_label("data").size - small.by_label("data").size == 16 * GIB
    assert big.by_label("root-a").size == small.by_label("root-a").size


@pytest.mark.parametrize("kwargs, words", [
    ({"disk_size": 12 * GIB}, "leaves"),
    ({"slot_size": 1 * GIB}, "too small"),
    ({"swap_size": 4 * GIB + 1}, "multiple of 1 MiB"),
])
def test_bad_sizes_are_refused_with_a_reason(kwargs, words):
    with pytest.raises(LayoutError, match=words):
        layout.plan(**kwargs)


def test_sfdisk_script_names_every_partition_in_sectors():
    lay = layout.plan()
    script = lay.sfdisk_script()
    assert script.startswith("label: gpt")
    root_a = lay.by_label("root-a")
    assert f"start={root_a.start // 512}, size={root_a.size // 512}" in script
    for part in lay.partitions:
        assert f'name="{part.label}"' in script


def test_fstab_mounts_by_label_with_data_binds_and_swap():
    tab = bootconf.fstab()
    lines = [l.split() for l in tab.splitlines() if l and not l.startswith("#")]
    by_mount = {l[1]: l for l in lines}
    assert by_mount["/"][0] == "/dev/root", "root is the slot the kernel mounted, never root-a by name"
    assert by_mount["/boot/grub"][0] == "LABEL=boot"
    assert by_mount["/data"][0] == "LABEL=data"
    assert by_mount["/var/lib/tether"][0] == "/data/tether" and "bind" in by_mount["/var/lib/tether"][3]
    assert by_mount["/var/log"][0] == "/data/log" and "bind" in by_mount["/var/log"][3]
    assert ["LABEL=swap", "none", "swap"] == by_mount["none"][:3]
    assert "/dev/" not in tab.replace("/dev/root ", "")


def test_grub_cfg_has_rauc_slot_logic_serial_console_and_labels():
    cfg = bootconf.grub_cfg()
    assert "load_env" in cfg and "save_env A_TRY A_OK B_TRY B_OK ORDER" in cfg
    assert "search --no-floppy --label --set=root root-a" in cfg
    assert "root=PARTLABEL=root-a rootwait" in cfg and "rauc.slot=A" in cfg
    assert "root=PARTLABEL=root-b rootwait" in cfg and "rauc.slot=B" in cfg
    assert "console=ttyS0,115200" in cfg and "serial --unit=0 --speed=115200" in cfg
    assert "terminal_output serial console" in cfg


def test_grub_boots_without_initramfs_and_reads_no_serial_keys():
    """No initrd line (the kernel mounts root itself) and no serial input (3 s per boot under TCG)."""
    cfg = bootconf.grub_cfg()
    assert "initrd" not in cfg
    assert "terminal_input" not in cfg


def test_every_slot_keeps_the_tsc_as_clock_source():
    """Without tsc=reliable a TCG guest reads the time through the emulated HPET."""
    linux = [l.split() for l in bootconf.grub_cfg().splitlines() if l.strip().startswith("linux ")]
    assert len(linux) == 2 and all("tsc=reliable" in args for args in linux)


def test_kernel_root_names_are_the_layouts_gpt_partition_names():
    """The kernel finds root by GPT partition name: sfdisk must write the same names."""
    script = layout.plan().sfdisk_script()
    for label in ("root-a", "root-b"):
        assert f"root=PARTLABEL={label} " in bootconf.grub_cfg()
        assert f'name="{label}"' in script
    assert bootconf.GRUBENV_INITIAL == {"ORDER": "A B", "A_OK": "1", "A_TRY": "0", "B_OK": "0", "B_TRY": "0"}
