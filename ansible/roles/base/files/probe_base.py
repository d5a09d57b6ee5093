# Read-only probe of the base disk, run once on the guest by the base role:
# everything the role checks, in one remote call (each call costs seconds
# under TCG). Prints one JSON object; the role asserts on it locally.
# argv[1]: JSON {"modules": [...]} -- drivers to look up with modinfo.
import json
import os
import subprocess
import sys

args = json.loads(sys.argv[1])


def read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def run(argv):
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    return proc.returncode, proc.stdout


rc, out = run(["dpkg-query", "--show", "--showformat=${Package}\t${db:Status-Status}\n"])
packages = sorted(name for name, _, status in (line.partition("\t") for line in out.splitlines())
                  if status == "installed")
kernels = sorted(entry for entry in (os.listdir("/lib/modules") if os.path.isdir("/lib/modules") else [])
                 if os.path.isdir("/lib/modules/" + entry))
modules = {}
if len(kernels) == 1:
    for name in args["modules"]:
        rc, out = run(["modinfo", "--set-version", kernels[0], "--field", "filename", name])
        modules[name] = out.strip() if rc == 0 else None
json.dump({
    "packages": packages,
    "kernels": kernels,
    "modules": modules,
    "initrds": sorted(entry for entry in os.listdir("/boot") if entry.startswith("initrd.img")),
    "fstab": read("/etc/fstab") or "",
    "grub_cfg": read("/boot/grub/grub.cfg") or "",
    "grub_hook": os.path.lexists("/etc/kernel/postinst.d/zz-update-grub"),
}, sys.stdout)
