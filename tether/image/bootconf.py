"""Text of the boot and mount configuration written into the base disk.

Pure functions of the layout, so they are unit tested and their text is
part of the base disk's cache key (change the GRUB script: new base disk).

GRUB follows the shape RAUC's grub backend documents: the environment block
holds ORDER plus <slot>_OK / <slot>_TRY, the script picks the first slot that
is OK and not already being tried, marks it as tried and saves the
environment; `rauc status mark-good` clears the TRY flag after a healthy
boot. Slots are found by label, never by device name: GRUB finds /boot by
filesystem label, the kernel mounts root by GPT partition name.

No initramfs: the cloud kernel has NVMe (the OVA's controller and EC2
Nitro's) and ext4 built in, so it mounts the root slot itself. Under TCG the
initramfs cost about 6 s of every boot (GRUB reading 15 MB through the BIOS,
unpacking, a second udev coldplug); the root file system is checked by
systemd-fsck-root instead. ``rootwait`` covers NVMe's asynchronous namespace
scan.

``tsc=reliable``: the kernel keeps the TSC as its clock. On vSphere it does
so by itself (the hypervisor declares the TSC reliable) and EC2 Nitro's TSC
is invariant; under QEMU's TCG its start-up synchronisation check fails and
it falls back to the HPET, where every clock read in user space is a system
call plus an emulated device access. That cost about 1.5 s of every boot.
"""

from __future__ import annotations

SERIAL_CONSOLE = "console=tty0 console=ttyS0,115200n8"
#: The kernel mounts root itself (no initramfs): by GPT partition name, which
#: the kernel resolves (it cannot read filesystem labels).
ROOT_ARGS = "root=PARTLABEL={label} rootwait rootfstype=ext4"
#: Keep the TSC as the clock source (see the module docstring).
CLOCK_ARGS = "tsc=reliable"

#: grubenv variables at first boot: slot A good, B empty (never chosen).
GRUBENV_INITIAL = {"ORDER": "A B", "A_OK": "1", "A_TRY": "0", "B_OK": "0", "B_TRY": "0"}

SLOTS = (("A", "root-a"), ("B", "root-b"))


def fstab() -> str:
    """fstab by LABEL: root slot A, data with bind mounts, swap."""
    return (
        "# tether appliance: partitions by label (docs/CONTRACTS.md, Disk layout)\n"
        "LABEL=root-a      /                ext4  defaults,errors=remount-ro  0 1\n"
        "LABEL=data        /data            ext4  defaults,nodev,nosuid       0 2\n"
        "/data/tether      /var/lib/tether  none  bind,x-systemd.requires-mounts-for=/data  0 0\n"
        "/data/log         /var/log         none  bind,x-systemd.requires-mounts-for=/data  0 0\n"
        "LABEL=swap        none             swap  sw                          0 0\n"
    )


def _slot_entry(index: int, slot: str, label: str) -> str:
    return (
        f'menuentry "tether slot {slot}" --id slot-{slot.lower()} {{\n'
        f"    search --no-floppy --label --set=root {label}\n"
        f"    linux /vmlinuz {ROOT_ARGS.format(label=label)} ro rauc.slot={slot} {CLOCK_ARGS} {SERIAL_CONSOLE}\n"
        f"}}\n"
    )


def grub_cfg() -> str:
    """A/B slot selection RAUC's grub backend can drive, serial console on."""
    select = "".join(
        f'    if [ "$SLOT" == "{slot}" ]; then\n'
        f"        INDEX={i}\n"
        f"        OK=${slot}_OK\n"
        f"        TRY=${slot}_TRY\n"
        f"        {slot}_TRY=1\n"
        f"    fi\n"
        for i, (slot, _) in enumerate(SLOTS)
    )
    # Values used when grubenv is missing: no slot is known good.
    defaults = 'set ORDER="A B"\n' + "".join(f"set {s}_{f}=0\n" for s, _ in SLOTS for f in ("OK", "TRY"))
    entries = "".join(_slot_entry(i, slot, label) for i, (slot, label) in enumerate(SLOTS))
    return (
        "# tether: A/B root slots for RAUC's grub backend (static; written by tether.image)\n"
        "set default=0\n"
        # No menu wait: the appliance has no one at its console (1 s per boot).
        "set timeout_style=hidden\n"
        "set timeout=0\n"
        # GRUB's messages go to the serial line too (EC2's console output), but
        # it reads no keys from it: with serial input GRUB's hidden-timeout key
        # check cost 3 s of every boot under TCG, and there is no menu to use.
        "serial --unit=0 --speed=115200 --word=8 --parity=no --stop=1\n"
        "terminal_output serial console\n"
        "\n"
        f"{defaults}"
        "load_env\n"
        "\n"
        "# pick the first slot in ORDER that is good and not being tried\n"
        "for SLOT in $ORDER; do\n"
        f"{select}"
        '    if [ "$OK" -eq 1 -a "$TRY" -eq 0 ]; then\n'
        "        default=$INDEX\n"
        "        break\n"
        "    fi\n"
        "done\n"
        "\n"
        "# no slot left to try: fall back to A and clear the flags (RAUC's example)\n"
        'if [ "$default" -eq 0 ]; then\n'
        '    if [ "$A_OK" -eq 1 -a "$A_TRY" -eq 1 ]; then\n'
        "        A_TRY=0\n"
        "    fi\n"
        '    if [ "$B_OK" -eq 1 -a "$B_TRY" -eq 1 ]; then\n'
        "        B_TRY=0\n"
        "    fi\n"
        "fi\n"
        "\n"
        "save_env A_TRY A_OK B_TRY B_OK ORDER\n"
        "\n"
        f"{entries}"
    )


def networkd_dhcp() -> str:
    """DHCP on every wired NIC (virtio in the build, vmxnet3 / ENA later)."""
    return (
        "# tether: DHCP on wired NICs; first-boot settings may replace this file\n"
        "[Match]\n"
        "Name=en* eth*\n"
        "\n"
        "[Network]\n"
        "DHCP=yes\n"
    )
