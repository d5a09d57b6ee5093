"""The appliance's distribution (tether-agent): agent, protocol, shared crypto; no home, no image tooling."""

import shutil
import zipfile
from pathlib import Path

from tether.image import agentdist, layer, wheelhouse

CHECKOUT = Path(__file__).resolve().parents[2]


def test_derived_project_keeps_agent_protocol_and_shared_modules_only():
    dist = agentdist.project_of(CHECKOUT / "pyproject.toml")
    assert {"tether", "tether.protocol", "tether.agent", "tether.agent.directory"} <= set(dist["packages"])
    assert not [p for p in dist["packages"] if p.startswith(("tether.home", "tether.image"))]
    assert dist["project"]["name"] == "tether-agent"
    assert dist["project"]["scripts"] == {"tether-agent": "tether.agent.cli:main"}
    main = __import__("tomllib").loads((CHECKOUT / "pyproject.toml").read_text())["project"]
    assert dist["project"]["dependencies"] == main["dependencies"]
    assert dist["project"]["version"] == main["version"]


def test_staged_copy_holds_no_home_or_image_files(tmp_path):
    staged = agentdist.stage(CHECKOUT, tmp_path / "src")
    files = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    assert "agent/cli.py" in files and "tether/protocol/__init__.py" in files and "tether/sealing.py" in files
    assert not [f for f in files if f.startswith(("home/", "tether/image/")) or "__pycache__" in f]


def _checkout_copy(top: Path) -> Path:
    for name in ("tether", "agent", "home", "ansible", "packer"):
        shutil.copytree(CHECKOUT / name, top / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copyfile(CHECKOUT / "pyproject.toml", top / "pyproject.toml")
    return top


def test_agent_wheel_has_no_home_or_image_files_and_home_edits_keep_the_layer_key(tmp_path):
    checkout = _checkout_copy(tmp_path / "checkout")
    wheel = wheelhouse.agent_wheel(checkout, tmp_path / "before")
    names = zipfile.ZipFile(wheel).namelist()
    assert "tether/agent/cli.py" in names and "tether/protocol/__init__.py" in names
    assert not [n for n in names if n.startswith(("tether/home/", "tether/image/"))]
    assert not [n for n in names if not n.startswith(("tether/", "tether_agent-"))]
    before = layer.key("base", wheel.parent, checkout)

    with (checkout / "home" / "cli.py").open("a") as fh:
        fh.write("# an edit of home only\n")
    after = layer.key("base", wheelhouse.agent_wheel(checkout, tmp_path / "after").parent, checkout)
    assert after == before
