"""Idempotence of the roles on a running guest: the cached provisioned layer is
the shared roles' first run, so applying them again must change nothing; the
per-image identity role applied twice changes nothing the second time.

Boots a copy of the cached layer for this checkout (images/.cache/provisioned-<key>.raw,
or $TETHER_IMAGE_CACHE) under qemu with a fresh build key and runs
ansible-playbook against it over a loopback SSH forward. Skips when that layer
is not cached (build an image first: any change to the shared roles or the
agent makes a new key). Takes minutes under TCG.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import vm

from tether.image import basedisk, builddisk, buildvars, credential, layer, wheelhouse

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("TETHER_IMAGE_CACHE", ROOT / "images" / ".cache"))
RECAP = re.compile(r"ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)")


@pytest.fixture(scope="module")
def guest():
    if os.geteuid() != 0:
        pytest.skip("needs root (loop mount to put the build key in)")
    # Not pytest's tmp_path: other pytest runs on this machine rotate
    # /tmp/pytest-of-<user>/ and removed the wheelhouse under a running play.
    with tempfile.TemporaryDirectory(prefix="tether-layer-idem-") as tmp:
        yield from _guest(Path(tmp))


def _guest(work: Path):
    wheels = work / "wheelhouse"
    wheelhouse.build(ROOT, wheels, cache=CACHE, say=lambda _m: None)
    inputs = basedisk.default_inputs()
    cached = layer.entry(CACHE, layer.key(inputs.key(), wheels)).path()
    if not cached.is_file():
        pytest.skip(f"no provisioned layer for this checkout ({cached.name}) in {CACHE}: build an image first")
    # Held as in the build: the firewall would drop SSH, the agent must not run.
    disk, key = builddisk.prepare(cached, work, inputs.layout, hold_units=builddisk.HOLD_UNITS)
    state = work / "home"
    credential.ensure_home(state, say=lambda _m: None)
    cred = credential.issue(state, work / "credential.json", [])
    variables = buildvars.make(wheels, work / "credential.json", "idempotence", cred["image_id"])
    vars_file = buildvars.write(work / "buildvars.json", variables)
    port = vm.free_port()
    cfg = vm.VmConfig(disk=disk, workdir=work / "vm", ssh_probe_port=port, cpus=2, memory_mib=2048,
                      accelerator=vm.choose_accelerator(CACHE).accelerator)
    with vm.Vm(cfg).start() as machine:
        machine.wait_for(lambda: vm.probe_forwarded_port(port, wait=2.0).state == "open", 600, "sshd in the guest",
                         interval=2.0)
        # A named host, as Packer's "default": an inventory host called 127.0.0.1
        # would also be what `delegate_to: localhost` means.
        inventory = work / "inventory"
        inventory.write_text(f"guest ansible_host=127.0.0.1 ansible_port={port} ansible_user=root\n")
        yield {"port": port, "key": key.private, "vars": vars_file, "machine": machine, "work": work,
               "inventory": inventory}


def _play(guest, tags: str) -> tuple[int, int, str]:
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible" / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_HOST_KEY_CHECKING="False")
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(
        [str(bin_dir / "ansible-playbook"), "-i", str(guest["inventory"]), "--private-key", str(guest["key"]),
         "-e", f"@{guest['vars']}", "--tags", tags, "site.yml"],
        cwd=ROOT / "ansible", env=env, capture_output=True, text=True, check=False, timeout=1800)
    (guest["work"] / f"ansible-{tags}.log").write_text(proc.stdout + proc.stderr)
    match = RECAP.search(proc.stdout)
    assert proc.returncode == 0 and match, proc.stdout[-4000:] + proc.stderr[-2000:]
    return int(match.group(2)), int(match.group(4)), proc.stdout


def test_shared_roles_change_nothing_on_the_layer(guest):
    changed, failed, out = _play(guest, ",".join(layer.layer_roles()))
    changes = [line for line in out.splitlines() if line.strip().startswith("changed:")]
    assert (changed, failed) == (0, 0), "second application changed:\n" + "\n".join(changes)


def test_identity_twice_changes_nothing_the_second_time(guest):
    _play(guest, "identity")
    changed, failed, out = _play(guest, "identity")
    assert (changed, failed) == (0, 0), out[-3000:]
