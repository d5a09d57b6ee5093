# Writes a role's configuration files and their directories in one remote
# call (a template or copy task costs two module calls and a transfer, 6-7 s
# under TCG). Like ansible.builtin.copy: only what differs is written, through
# a temporary file in the same directory, checked with `validate` first.
# argv[1] or stdin: JSON {"dirs": [{"path", "mode", "owner", "group"}],
#                "files": [{"path", "content", "mode", "owner", "group", "validate"?}]}
# ("validate" is an argv list with "%s" for the temporary file).
# Prints JSON {"changed": [path, ...]}.
import grp
import json
import os
import pwd
import subprocess
import sys

# identity passes the spec on stdin: it holds the private key, which must not be on a command line.
spec = json.loads(sys.argv[1] if len(sys.argv) > 1 else sys.stdin.read())
changed = []


def ids(entry):
    return pwd.getpwnam(entry.get("owner", "root")).pw_uid, grp.getgrnam(entry.get("group", "root")).gr_gid


def fix_attrs(path, entry):
    uid, gid = ids(entry)
    mode = int(entry["mode"], 8)
    st = os.lstat(path)
    if (st.st_uid, st.st_gid) != (uid, gid) or st.st_mode & 0o7777 != mode:
        os.chown(path, uid, gid)
        os.chmod(path, mode)
        return True
    return False


for entry in spec.get("dirs", []):
    path = entry["path"]
    made = False
    if not os.path.isdir(path):
        os.makedirs(path)
        made = True
    if fix_attrs(path, entry) or made:
        changed.append(path)
for entry in spec.get("files", []):
    path, data = entry["path"], entry["content"].encode()
    try:
        with open(path, "rb") as handle:
            same = handle.read() == data
    except FileNotFoundError:
        same = False
    if same:
        if fix_attrs(path, entry):
            changed.append(path)
        continue
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tether-tmp")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    # Created owner-only: a private key is never readable by others, not even briefly.
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
        handle.write(data)
    fix_attrs(tmp, entry)
    if entry.get("validate"):
        try:
            proc = subprocess.run([arg.replace("%s", tmp) for arg in entry["validate"]],
                                  capture_output=True, text=True, check=False)
        except OSError as exc:
            os.unlink(tmp)
            sys.exit(f"{path}: cannot run validation {entry['validate']}: {exc}")
        if proc.returncode != 0:
            os.unlink(tmp)
            sys.exit(f"{path}: validation {entry['validate']} failed:\n{proc.stdout}{proc.stderr}")
    os.replace(tmp, path)
    changed.append(path)
json.dump({"changed": changed}, sys.stdout)
