"""Packer templates (validated by the real packer) and the output parser."""

import shutil
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from tether.image import packerrun

PACKER_DIR = Path(__file__).resolve().parents[2] / "packer"


@pytest.fixture
def template_vars(tmp_path):
    key = ed25519.Ed25519PrivateKey.generate()
    key_file = tmp_path / "build_key"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
    playbook = Path(sys.executable).with_name("ansible-playbook")
    if not playbook.exists():
        pytest.skip("ansible-playbook is not in this venv (make deps)")
    return {"ssh_private_key_file": str(key_file), "ansible_playbook": str(playbook)}


@pytest.mark.skipif(shutil.which("packer") is None, reason="packer is not installed (make deps)")
def test_templates_validate_with_both_sources(template_vars, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # paths in the templates must not depend on the cwd
    rc, out = packerrun.validate(template_vars)
    assert rc == 0, out


@pytest.mark.skipif(shutil.which("packer") is None, reason="packer is not installed (make deps)")
@pytest.mark.parametrize("only", ["qemu.tether", "amazon-ebs.tether"])
def test_each_source_validates_on_its_own(template_vars, only):
    from packerpy import PackerExecutable

    exe = PackerExecutable(executable_path=shutil.which("packer"), machine_readable=False)
    rc, out, err = exe.validate(str(PACKER_DIR), only=only, var=template_vars)
    assert rc == 0, (out + err).decode()


def test_templates_keep_to_what_packer_1_6_6_reads():
    text = "".join(p.read_text() for p in PACKER_DIR.glob("*.pkr.hcl"))
    assert "required_plugins" not in text and "data \"" not in text
    plugins = (PACKER_DIR / "plugins" / "plugins.pkr.hcl").read_text()
    assert "required_plugins" in plugins
    for plugin in ("hashicorp/qemu", "hashicorp/amazon", "hashicorp/ansible"):
        assert plugin in plugins


def test_guest_network_is_restricted_to_loopback_forward():
    qemu = (PACKER_DIR / "qemu.pkr.hcl").read_text()
    assert "restrict=on" in qemu
    assert "hostfwd=tcp:127.0.0.1:{{ .SSHHostPort }}-:22" in qemu
    assert "disk_image   = true" in qemu or "disk_image = true" in qemu
    build = (PACKER_DIR / "build.pkr.hcl").read_text()
    assert build.count("use_proxy     = false") == 2


def test_machine_readable_lines_are_parsed_and_unescaped():
    line = "1700000000,,ui,message,    qemu.tether: TASK [base : a%!(PACKER_COMMA) b]\\n    next\n"
    ts, kind, text = packerrun.parse_line(line)
    assert (ts, kind) == (1700000000.0, "message")
    assert text == "    qemu.tether: TASK [base : a, b]\n    next"
    assert packerrun.parse_line("1700000000,,artifact-count,1") is None
    assert packerrun.parse_line("plain text") is None


def test_timeline_splits_the_run_into_stages():
    tl = packerrun.Timeline(start=100.0)
    for ts, text in [(110, "==> qemu.tether: Starting VM"), (130, "==> qemu.tether: Connected to SSH!"),
                     (140, "TASK [base : x]"), (300, "TASK [sysprep : Remove the build key]"),
                     (310, "TASK [sysprep : Purge]"), (340, "==> qemu.tether: Gracefully halting virtual machine...")]:
        tl.feed(float(ts), text)
    tl.end = 360.0
    assert tl.durations() == {"packer_boot": 30.0, "ansible": 170.0, "sysprep": 40.0, "shutdown": 20.0}


def test_timeline_of_a_run_that_stopped_early():
    tl = packerrun.Timeline(start=0.0)
    tl.feed(25.0, "Connected to SSH!")
    assert tl.durations() == {"packer_boot": 25.0}


def test_missing_plugins_get_a_hint_naming_packer_init():
    lines = ['Error: Unknown source type "qemu"', "The source qemu is unknown by Packer"]
    assert "packer init packer/plugins" in packerrun.hint(lines)
    assert "serial.log" in packerrun.hint(["Timeout waiting for SSH."])
    assert packerrun.hint(["something else"]) is None
