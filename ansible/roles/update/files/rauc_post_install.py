#!/usr/bin/python3
"""RAUC post-install handler: make the freshly written slot boot as this same appliance.

RAUC runs it as root after writing the slots, before the agent activates the
new slot (activate-installed=false). It gives each target slot its own
filesystem label (root-a / root-b: GRUB finds a slot's kernel by label, and
the bundle's tar leaves a label RAUC chose), and copies what is per-image or
per-instance into it: /etc/tether (the image's key, certificate and
settings; no bundle carries them) and /etc/machine-id (the journal and the
agent's machine fingerprint stay the same). It writes the bundle's version
(the bundle's manifest.raucm; RAUC 1.8 gives handlers the bundle's mount
point, not the manifest's fields) to the slot's
/usr/local/lib/tether/image-version: a bundle may be cut from an image built
earlier, and the agent reports this file as the version it runs (a wrong one
would make home offer the same update again and again). Any failure fails the install,
so the agent never activates a slot that would boot as a stranger.
"""
import os
import subprocess
import sys
import tempfile

CARRY = ("/etc/tether", "/etc/machine-id")
VERSION_FILE = "/usr/local/lib/tether/image-version"


def bundle_version() -> str:
    """version= of the [update] section of the bundle being installed."""
    if os.environ.get("RAUC_MF_VERSION"):
        return os.environ["RAUC_MF_VERSION"]
    for var in ("RAUC_BUNDLE_MOUNT_POINT", "RAUC_UPDATE_SOURCE"):
        top = os.environ.get(var)
        if not top or not os.path.isfile(os.path.join(top, "manifest.raucm")):
            continue
        section = ""
        with open(os.path.join(top, "manifest.raucm"), encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if line.startswith("["):
                    section = line
                elif section == "[update]" and line.startswith("version="):
                    return line.split("=", 1)[1].strip()
    raise SystemExit("tether post-install: the bundle's version is unknown (no RAUC_MF_VERSION, no "
                     "manifest.raucm under RAUC_BUNDLE_MOUNT_POINT): refusing to install a slot "
                     "that would report a wrong version")


def main() -> int:
    version = bundle_version()
    for n in os.environ.get("RAUC_TARGET_SLOTS", "").split():
        device = os.environ[f"RAUC_SLOT_DEVICE_{n}"]
        bootname = os.environ.get(f"RAUC_SLOT_BOOTNAME_{n}", "")
        if bootname not in ("A", "B"):
            continue
        subprocess.run(["e2label", device, f"root-{bootname.lower()}"], check=True)
        mnt = tempfile.mkdtemp(prefix="tether-newslot-")
        subprocess.run(["mount", "-o", "nodev,nosuid", device, mnt], check=True)
        try:
            for path in CARRY:
                if os.path.lexists(path):
                    subprocess.run(["cp", "-a", "--", path, mnt + os.path.dirname(path) + "/"], check=True)
            os.makedirs(mnt + os.path.dirname(VERSION_FILE), exist_ok=True)
            with open(mnt + VERSION_FILE, "w", encoding="utf-8") as fh:
                fh.write(version + "\n")
        finally:
            subprocess.run(["umount", mnt], check=True)
            os.rmdir(mnt)
        print(f"slot {bootname}: labelled root-{bootname.lower()}, carried over {', '.join(CARRY)}, "
              f"version {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
