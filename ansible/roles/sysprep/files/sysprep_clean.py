# The sysprep role's removals in one remote call (each call costs seconds
# under TCG; the loops this replaces made one call per file). In order:
# build keys and SSH host keys, machine-id "uninitialized", per-machine files,
# /tmp and /var/tmp emptied, apt lists/caches and leases, the running journal
# moved off /var, logs and the journal's machine directories, documentation.
# argv[1]: JSON spec (see tasks/clean.yml). Prints JSON {"removed": n, "changed": bool}.
import fnmatch
import json
import os
import shutil
import subprocess
import sys

spec = json.loads(sys.argv[1])
removed = 0
changed = False


def remove(path):
    global removed
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)
    else:
        return
    removed += 1


def files_under(top, keep=()):
    for dirpath, _dirs, names in os.walk(top):
        for name in names:
            if name not in keep:
                yield os.path.join(dirpath, name)


for path in spec["remove"]:
    remove(path)
for path in spec.get("remove_dirs_if_empty", []):
    if os.path.isdir(path) and not os.listdir(path):
        os.rmdir(path)
        removed += 1
for directory, pattern in spec["remove_matching"]:
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if fnmatch.fnmatch(name, pattern):
                remove(os.path.join(directory, name))
# "uninitialized": systemd makes a new machine-id at first boot and treats that
# boot as the first one (ConditionFirstBoot=yes). The file must exist.
machine_id = spec["machine_id"]
try:
    with open(machine_id) as handle:
        current = handle.read()
except FileNotFoundError:
    current = None
if current != "uninitialized\n" or os.stat(machine_id).st_mode & 0o7777 != 0o444:
    with open(machine_id + ".tmp", "w") as handle:
        handle.write("uninitialized\n")
    os.chmod(machine_id + ".tmp", 0o444)
    os.replace(machine_id + ".tmp", machine_id)
    changed = True
# The running module's own AnsiballZ payload is in /tmp (ansible_*_payload_*):
# it must stay until this call returns, and Ansible removes it then.
for directory in spec["empty"]:
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if not fnmatch.fnmatch(name, "ansible_*_payload_*"):
                remove(os.path.join(directory, name))
for directory in spec["clean"]:
    for path in list(files_under(directory)):
        remove(path)
# journald would go on writing (and at shutdown re-create) files under
# /var/log/journal: send it to /run/log/journal until the appliance's first
# boot, where systemd-journal-flush.service brings it back to /var.
subprocess.run(["journalctl", "--relinquish-var"], check=True)
changed = True
for directory in spec["logs"]:
    for path in list(files_under(directory)):
        remove(path)
journal = "/var/log/journal"
if os.path.isdir(journal):
    for name in os.listdir(journal):
        if os.path.isdir(os.path.join(journal, name)):
            remove(os.path.join(journal, name))
# The appliance has no login and no local user: manual pages, documentation
# (the copyright files stay) and message translations only make the disk bigger.
for directory in spec["docs"]:
    for dirpath, _dirs, names in os.walk(directory):
        for name in names:
            if name not in ("copyright", "locale.alias"):
                remove(os.path.join(dirpath, name))
    for dirpath, dirs, _names in os.walk(directory):
        for name in dirs:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                remove(path)
json.dump({"removed": removed, "changed": changed or removed > 0}, sys.stdout)
