# Installs the tether agent (distribution tether-agent) into its venv on the guest, in one remote call
# (each call costs seconds under TCG): install directory, venv, the wheels
# from the wheelhouse archive (pip --no-index, no network), then a check
# that the agent runs. Installs only when the venv lacks this version.
# argv[1]: JSON {"install_dir", "venv", "archive", "wheelhouse", "version"}.
# Prints JSON {"changed": bool, "version": str}.
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile

args = json.loads(sys.argv[1])
venv, python = args["venv"], os.path.join(args["venv"], "bin", "python3")
changed = False


def run(argv, what):
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"{what} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout


os.makedirs(args["install_dir"], mode=0o755, exist_ok=True)
st = os.stat(args["install_dir"])
if (st.st_mode & 0o7777, st.st_uid, st.st_gid) != (0o755, 0, 0):
    os.chown(args["install_dir"], 0, 0)
    os.chmod(args["install_dir"], 0o755)
    changed = True
# pip is not installed into the venv (ensurepip would byte-compile pip and
# setuptools, tens of seconds under TCG, for a venv that is never changed in
# place): Debian's own pip wheel (python3-pip-whl, a dependency of
# python3-venv) runs straight from the wheel file.
pip_wheels = sorted(glob.glob("/usr/share/python-wheels/pip-*.whl"))
if not os.path.exists(python):
    run(["/usr/bin/python3", "-m", "venv"] + (["--without-pip"] if pip_wheels else []) + [venv], "python3 -m venv")
    changed = True
pip = [python, os.path.join(pip_wheels[-1], "pip")] if pip_wheels else [python, "-m", "pip"]
probe = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('tether-agent'))"],
                       capture_output=True, text=True, check=False)
if probe.returncode != 0 or probe.stdout.strip() != args["version"]:
    shutil.rmtree(args["wheelhouse"], ignore_errors=True)
    os.makedirs(args["wheelhouse"], mode=0o755)
    with tarfile.open(args["archive"]) as tar:
        # Our own archive; the "data" filter where this Python has it.
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(args["wheelhouse"], **extra)
    run(pip + ["install", "--no-index", "--no-cache-dir", "--disable-pip-version-check",
         "--find-links=" + args["wheelhouse"], "tether-agent==" + args["version"]], "pip install")
    changed = True
run([os.path.join(venv, "bin", "tether-agent"), "--help"], "tether-agent --help")
json.dump({"changed": changed, "version": args["version"]}, sys.stdout)
