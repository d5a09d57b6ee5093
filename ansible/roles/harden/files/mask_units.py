# Masks systemd units and removes enabled instances, in one remote call (each
# call costs seconds under TCG). Masking is what `systemctl mask` does: a link
# to /dev/null in /etc/systemd/system, which also masks every instance of a
# template unit. systemd is reloaded by the role's handler.
# argv[1]: JSON {"mask": [unit, ...], "disable": {"wants dir": [glob, ...]}}.
# Prints JSON {"changed": [what changed, ...]}.
import fnmatch
import json
import os
import shutil
import sys

args = json.loads(sys.argv[1])
changed = []
for unit in args["mask"]:
    path = os.path.join("/etc/systemd/system", unit)
    if os.path.islink(path) and os.readlink(path) == "/dev/null":
        continue
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)
    os.symlink("/dev/null", path)
    changed.append("masked " + unit)
for wants, patterns in args["disable"].items():
    if not os.path.isdir(wants):
        continue
    for name in sorted(os.listdir(wants)):
        if any(fnmatch.fnmatch(name, pattern) for pattern in patterns):
            os.unlink(os.path.join(wants, name))
            changed.append("disabled " + os.path.join(wants, name))
json.dump({"changed": changed}, sys.stdout)
