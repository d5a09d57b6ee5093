"""The appliance's distribution, `tether-agent`: the agent and what it shares with home.

The checkout is one distribution, `tether` (pyproject.toml): `make venv`
installs it editable with the agent, home and this image tooling, because
the tests run all three. The appliance must carry only the agent, the wire
protocol and the shared crypto (tether.protocol, tether.sealing,
tether.configsig, ...): home holds a CA and SQLite stores, the image tooling
drives qemu and EBS, and neither belongs on a machine a customer runs. And
the provisioned layer is cached by the wheels it installs, so a wheel
carrying home/ would make every home edit rebuild the layer.

So the image installs a second distribution, `tether-agent`, built from a
staged copy of the checkout with a pyproject written here from the main
one: every package of pyproject.toml except those under EXCLUDED (by
prefix, so a new shared module or agent sub-package goes on the appliance
without touching this file), the same version and runtime dependencies (one
place to change them), package data and console scripts of the kept
packages only, and no readme (its text is no behaviour of the appliance).

Why derived and staged rather than a second checked-in pyproject: setuptools
takes no package directory outside the project root, and a second hand-kept
package list and dependency list would drift from the first; staging copies
only the kept packages' directories, so nothing else can slip into the wheel.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

from .errors import BuildError

#: The distribution's name (its wheel: tether_agent-<version>-py3-none-any.whl).
NAME = "tether-agent"
#: Import packages that never go on the appliance: home and the image tooling.
EXCLUDED = ("tether.home", "tether.image")


def _excluded(package: str) -> bool:
    return any(package == top or package.startswith(top + ".") for top in EXCLUDED)


def _package_dir(package: str, package_dirs: dict[str, str]) -> str:
    """The directory of `package` in the checkout (setuptools' package-dir rule)."""
    if package in package_dirs:
        return package_dirs[package]
    parent, _, leaf = package.rpartition(".")
    if not parent:
        return package
    return f"{_package_dir(parent, package_dirs)}/{leaf}"


def project_of(pyproject: Path) -> dict:
    """The agent distribution's settings, derived from the checkout's pyproject.toml."""
    doc = tomllib.loads(pyproject.read_text())
    project, setup = doc.get("project", {}), doc.get("tool", {}).get("setuptools", {})
    packages = [p for p in setup.get("packages", []) if not _excluded(p)]
    if "tether.agent" not in packages:
        raise BuildError(f"{pyproject} lists no tether.agent package: nothing to put on the appliance")
    dirs = setup.get("package-dir", {})
    scripts = {name: target for name, target in project.get("scripts", {}).items()
               if not _excluded(target.split(":", 1)[0])}
    return {
        "project": {"name": NAME, "version": project["version"],
                    "description": "tether appliance agent: the agent, the wire protocol and the shared crypto",
                    "requires-python": project.get("requires-python", ">=3.11"),
                    "dependencies": list(project.get("dependencies", [])), "scripts": scripts},
        "packages": packages,
        "package-dir": {p: _package_dir(p, dirs) for p in packages},
        "package-data": {p: v for p, v in setup.get("package-data", {}).items() if p in packages},
    }


def pyproject_text(dist: dict) -> str:
    """pyproject.toml of the staged copy (TOML strings and arrays written as JSON)."""
    project = dist["project"]
    lines = ['[build-system]', 'requires = ["setuptools>=64", "wheel"]',
             'build-backend = "setuptools.build_meta"', "", "[project]"]
    lines += [f"{key} = {json.dumps(project[key])}"
              for key in ("name", "version", "description", "requires-python", "dependencies")]
    lines += ["", "[project.scripts]"] + [f"{json.dumps(k)} = {json.dumps(v)}" for k, v in project["scripts"].items()]
    lines += ["", "[tool.setuptools]", f"packages = {json.dumps(dist['packages'])}", "",
              "[tool.setuptools.package-dir]"]
    lines += [f"{json.dumps(k)} = {json.dumps(v)}" for k, v in dist["package-dir"].items()]
    lines += ["", "[tool.setuptools.package-data]"]
    lines += [f"{json.dumps(k)} = {json.dumps(v)}" for k, v in dist["package-data"].items()]
    return "\n".join(lines) + "\n"


def stage(checkout: Path, dest: Path) -> Path:
    """Copy the agent distribution's sources into `dest` (emptied first); return it.

    Each kept package contributes the files of its own directory and its
    non-package sub-directories (package data such as agent/data/); the
    directory of any other package (tether/image/ inside tether/) is skipped.
    """
    dist = project_of(checkout / "pyproject.toml")
    all_dirs = set(_all_package_dirs(checkout / "pyproject.toml"))
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for rel in dist["package-dir"].values():
        src = checkout / rel
        for entry in sorted(src.iterdir()):
            rel_entry = f"{rel}/{entry.name}"
            target = dest / rel_entry
            if entry.name == "__pycache__" or rel_entry in all_dirs:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if entry.is_dir():
                shutil.copytree(entry, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copyfile(entry, target)
    (dest / "pyproject.toml").write_text(pyproject_text(dist))
    return dest


def _all_package_dirs(pyproject: Path) -> list[str]:
    """The directory of every package of the checkout, kept or not."""
    setup = tomllib.loads(pyproject.read_text()).get("tool", {}).get("setuptools", {})
    dirs = setup.get("package-dir", {})
    return [_package_dir(p, dirs) for p in setup.get("packages", [])]
