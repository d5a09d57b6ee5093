"""The image playbook: ansible-lint (production profile), syntax check, role hygiene.

No VM: these read ansible/ only. The playbook's behaviour on a guest is checked by
tests/image against a finished image.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = ROOT / "ansible"
BIN = Path(sys.executable).parent
ROLES = ["base", "agent", "firstboot", "harden", "identity", "update", "sysprep"]

sys.path.insert(0, str(ROOT / "tests" / "image"))
import nftrules  # noqa: E402


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{path} missing: install the project with `make deps` (extras build,test)")
    return str(path)


def _env() -> dict[str, str]:
    env = dict(os.environ, ANSIBLE_CONFIG=str(ANSIBLE / "ansible.cfg"), NO_COLOR="1")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_ansible_lint_production_profile():
    proc = subprocess.run([_tool("ansible-lint"), "--profile", "production", "--nocolor", "--offline"],
                          cwd=ANSIBLE, env=_env(), capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_site_syntax_check():
    proc = subprocess.run([_tool("ansible-playbook"), "-i", "localhost,", "--syntax-check", "site.yml"],
                          cwd=ANSIBLE, env=_env(), capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_site_runs_roles_in_order_with_sysprep_last():
    play = yaml.safe_load((ANSIBLE / "site.yml").read_text())[0]
    assert [r["role"] for r in play["roles"]] == ROLES


@pytest.mark.parametrize("role", ROLES)
def test_role_has_argument_specs_for_its_defaults(role):
    specs = yaml.safe_load((ANSIBLE / "roles" / role / "meta" / "argument_specs.yml").read_text())
    options = specs["argument_specs"]["main"]["options"]
    defaults_file = ANSIBLE / "roles" / role / "defaults" / "main.yml"
    defaults = yaml.safe_load(defaults_file.read_text()) or {}
    undocumented = sorted(set(defaults) - set(options))
    assert undocumented == [], f"{role}: defaults without an argument spec: {undocumented}"


def _render(role: str, template: str, **extra) -> str:
    defaults = yaml.safe_load((ANSIBLE / "roles" / role / "defaults" / "main.yml").read_text())
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(ANSIBLE / "roles" / role / "templates"),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.get_template(template).render({"ansible_managed": "test", **defaults, **extra})


def test_nftables_template_policy():
    chains = nftrules.parse(_render("harden", "nftables.conf.j2"))
    by = {hook: nftrules.by_hook(chains, hook)[0] for hook in ("input", "forward", "output")}
    assert {c.policy for c in by.values()} == {"drop"}
    assert by["input"].ports("tcp") == set() and by["input"].ports("udp") == set()
    assert by["forward"].accepts() == []
    assert by["output"].ports("tcp") == {53, 88, 389, 443, 636, 3268, 3269}
    assert by["output"].ports("udp") == {53, 88, 123, 389}


def test_nftables_template_extra_proxy_port():
    chains = nftrules.parse(_render("harden", "nftables.conf.j2", harden_nft_out_extra_tcp_ports=[3128]))
    assert 3128 in nftrules.by_hook(chains, "output")[0].ports("tcp")


def test_nftables_template_is_valid_nft():
    nft = Path("/usr/sbin/nft")
    if not nft.exists() or os.geteuid() != 0:
        pytest.skip("nft --check needs the nftables package and root")
    text = _render("harden", "nftables.conf.j2")
    proc = subprocess.run([str(nft), "--check", "--file", "-"], input=text, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_sysctl_template_lists_every_setting():
    text = _render("harden", "sysctl.conf.j2")
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    defaults = yaml.safe_load((ANSIBLE / "roles" / "harden" / "defaults" / "main.yml").read_text())
    assert len(lines) == len(defaults["harden_sysctl"])
    assert "kernel.kptr_restrict = 2" in lines
