# Masks systemd units and removes enabled instances, in one remote call (each
# call costs seconds under TCG). Masking is what `systemctl mask` does: a link
# to /dev/null in /etc/systemd/system, which also masks every instance of a
# template unit. systemd is reloaded by the role's handler.
# Generators are disabled the documented way: a link to /dev/null of the same
# name in /etc/systemd/system-generators.
# argv[1]: JSON {"mask": [unit, ...], "disable": {"wants dir": [glob, ...]},
#                "generators": [generator, ...]}.
# Prints JSON {"changed": [what changed, ...]}.
import fnmatch
import json
import os
import shutil
import sys

args = json.loads(sys.argv[1])
changed = []


def link_to_null(directory, name):
    """True when `name` in `directory` was not yet a link to /dev/null and now is."""
    path = os.path.join(directory, name)
    if os.path.islink(path) and os.readlink(path) == "/dev/null":
        return False
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    os.symlink("/dev/null", path)
    return True


for unit in args["mask"]:
    if link_to_null("/etc/systemd/system", unit):
        changed.append("masked " + unit)
for generator in args.get("generators", []):
    if link_to_null("/etc/systemd/system-generators", generator):
        changed.append("disabled generator " + generator)
for wants, patterns in args["disable"].items():
    if not os.path.isdir(wants):
        continue
    for name in sorted(os.listdir(wants)):
        if any(fnmatch.fnmatch(name, pattern) for pattern in patterns):
            os.unlink(os.path.join(wants, name))
            changed.append("disabled " + os.path.join(wants, name))
json.dump({"changed": changed}, sys.stdout)
