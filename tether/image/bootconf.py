"""Text of the boot and mount configuration written into the base disk.

Pure functions of the layout, so they are unit tested and their text is
part of the base disk's cache key (change the GRUB script: new base disk).

GRUB uses the variables of RAUC's grub backend: the environment block
(grubenv, on the boot partition outside both slots, so installing into
either slot never touches it) holds ORDER plus <slot>_OK / <slot>_TRY. Here
<slot>_TRY counts the boots of that slot since it was last marked good
(`rauc status mark-good` sets OK=1 TRY=0; an install sets OK=1 TRY=0 and puts
the new slot first in ORDER). The script boots the first slot in ORDER that
is OK and has tried fewer than MAX_TRIES times, and counts the try. A slot
that used its tries stays skipped (sticky fallback: RAUC's contrib example
resets the flags whenever entry 0 boots, and entry 0 is slot A here, so a
broken B was retried on every second boot); the counts are reset only when
nothing is left to boot. Slots are found by label, never by device name:
GRUB finds a slot's kernel by filesystem label (the installer sets the new
slot's label), the kernel mounts root by GPT partition name, and fstab names
the root as /dev/root (whichever slot the kernel mounted).

``panic=10``: Debian's kernel otherwise hangs forever on a panic; a reboot
counts as a failed try and GRUB moves on.

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
#: Reboot 10 s after a kernel panic instead of hanging (a failed try).
PANIC_ARGS = "panic=10"
#: Boots a slot gets after an install (or after its last mark-good) before
#: GRUB falls back to the other slot.
MAX_TRIES = 3

#: grubenv variables at first boot: slot A good, B empty (never chosen).
GRUBENV_INITIAL = {"ORDER": "A B", "A_OK": "1", "A_TRY": "0", "B_OK": "0", "B_TRY": "0"}

SLOTS = (("A", "root-a"), ("B", "root-b"))
#: The boot partition (grub.cfg, grubenv, GRUB's modules) is mounted here.
BOOT_MOUNT = "/boot/grub"


def fstab() -> str:
    """fstab: root is whichever slot the kernel mounted; boot, data with bind mounts, swap."""
    return (
        "# tether appliance: partitions by label (docs/CONTRACTS.md, Disk layout).\n"
        "# / is the slot GRUB booted (root=PARTLABEL=root-a|root-b), never a fixed label.\n"
        "/dev/root         /                ext4  defaults,errors=remount-ro  0 1\n"
        f"LABEL=boot        {BOOT_MOUNT:<16} ext4  defaults,nodev,nosuid,noexec  0 2\n"
        "LABEL=data        /data            ext4  defaults,nodev,nosuid       0 2\n"
        "/data/tether      /var/lib/tether  none  bind,x-systemd.requires-mounts-for=/data  0 0\n"
        "/data/log         /var/log         none  bind,x-systemd.requires-mounts-for=/data  0 0\n"
        "LABEL=swap        none             swap  sw                          0 0\n"
    )


def _slot_entry(slot: str, label: str) -> str:
    return (
        f'menuentry "tether slot {slot}" --id slot-{slot} {{\n'
        f"    search --no-floppy --label --set=root {label}\n"
        f"    linux /vmlinuz {ROOT_ARGS.format(label=label)} ro rauc.slot={slot} {PANIC_ARGS} "
        f"{CLOCK_ARGS} {SERIAL_CONSOLE}\n"
        f"}}\n"
    )


def _count_try(slot: str, indent: str) -> str:
    """GRUB has no arithmetic: TRY 0 -> 1 -> ... -> MAX_TRIES by cases."""
    lines = []
    for n in range(MAX_TRIES):
        kw = "if" if n == 0 else "elif"
        lines.append(f'{indent}{kw} [ "${slot}_TRY" = "{n}" ]; then\n'
                     f"{indent}    set {slot}_TRY={n + 1}\n"
                     f"{indent}    set CHOSEN={slot}\n")
    return "".join(lines) + f"{indent}fi\n"


def grub_cfg() -> str:
    """A/B slot selection with per-slot try counting and sticky fallback, serial console on."""
    pick = "".join(
        f'        if [ "$SLOT" = "{slot}" -a "${slot}_OK" = "1" ]; then\n'
        f"{_count_try(slot, '            ')}"
        f"        fi\n"
        for slot, _ in SLOTS
    )
    reset = "".join(f"    set {slot}_TRY=0\n" for slot, _ in SLOTS)
    first_good = "".join(
        f'            if [ "$SLOT" = "{slot}" -a "${slot}_OK" = "1" ]; then\n'
        f"                set {slot}_TRY=1\n"
        f"                set CHOSEN={slot}\n"
        f"            fi\n"
        for slot, _ in SLOTS
    )
    # Values used when grubenv is missing: no slot is known good.
    defaults = 'set ORDER="A B"\n' + "".join(f"set {s}_{f}=0\n" for s, _ in SLOTS for f in ("OK", "TRY"))
    saved = " ".join(f"{s}_TRY {s}_OK" for s, _ in SLOTS)
    entries = "".join(_slot_entry(slot, label) for slot, label in SLOTS)
    return (
        "# tether: A/B root slots for RAUC's grub backend (static; written by tether.image.bootconf)\n"
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
        f"# the first slot in ORDER that is good and has tried fewer than {MAX_TRIES} times; count the try\n"
        'set CHOSEN=""\n'
        "for SLOT in $ORDER; do\n"
        '    if [ -z "$CHOSEN" ]; then\n'
        f"{pick}"
        "    fi\n"
        "done\n"
        "\n"
        "# nothing left to boot: only now reset the counts; the first good slot in ORDER, else A\n"
        'if [ -z "$CHOSEN" ]; then\n'
        f"{reset}"
        "    for SLOT in $ORDER; do\n"
        '        if [ -z "$CHOSEN" ]; then\n'
        f"{first_good}"
        "        fi\n"
        "    done\n"
        '    if [ -z "$CHOSEN" ]; then\n'
        "        set CHOSEN=A\n"
        "    fi\n"
        "fi\n"
        "\n"
        f"save_env {saved} ORDER\n"
        'set default="slot-$CHOSEN"\n'
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
