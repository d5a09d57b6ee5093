"""The wheelhouse the agent role installs from (the guest has no network).

It holds the tether-agent wheel (tether.image.agentdist: the agent, the
protocol and the shared crypto of this checkout, nothing of home or of this
tooling) plus binary wheels of the appliance's runtime dependencies
(websockets, cryptography, psutil, ldap3 and theirs) for the guest: CPython 3.11 on x86_64 glibc (Debian 12). The dependencies are
fetched with explicit target tags, so the build machine's own Python may
differ from the guest's without putting an unusable wheel into the image.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tomllib
from pathlib import Path

from . import agentdist
from .cache import Entry
from .errors import BuildError
from .proc import run

#: File names of the agent's wheel (a wheel's name spells "-" as "_").
AGENT_WHEEL_PREFIX = agentdist.NAME.replace("-", "_") + "-"

#: The guest: Debian 12's python3 (3.11) on x86_64 with glibc 2.36.
GUEST_PYTHON = "3.11"
GUEST_ABI = "cp311"
GUEST_PLATFORMS = ("manylinux_2_36_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                   "manylinux2014_x86_64", "linux_x86_64")


def runtime_requirements(pyproject: Path) -> list[str]:
    """The [project] dependencies of the checkout: what the agent imports."""
    data = tomllib.loads(pyproject.read_text())
    deps = data.get("project", {}).get("dependencies", [])
    if not deps:
        raise BuildError(f"{pyproject} lists no [project] dependencies")
    return list(deps)


def download_args(requirements: list[str], dest: Path) -> list[str]:
    """pip arguments fetching binary wheels for the guest's interpreter."""
    args = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
            "--only-binary=:all:", "--implementation", "cp", "--python-version", GUEST_PYTHON,
            "--abi", GUEST_ABI, "--abi", "abi3", "--abi", "none", "--dest", str(dest)]
    for platform in GUEST_PLATFORMS:
        args += ["--platform", platform]
    return args + requirements


def deps_key(requirements: list[str]) -> str:
    """Cache key of the dependency wheels: requirements and the guest's tags."""
    doc = "\n".join(sorted(requirements) + [GUEST_PYTHON, GUEST_ABI, *GUEST_PLATFORMS])
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def _download(requirements: list[str], dest: Path) -> None:
    try:
        run(download_args(requirements, dest),
            what="fetching the runtime dependency wheels for the guest (pip download)")
    except BuildError as exc:
        raise BuildError(f"{exc}\n    check that PyPI (or the pip index configured here) is reachable") from exc


def _dependency_wheels(requirements: list[str], cache: Path, say) -> Path:
    """A directory of dependency wheels, downloaded once per requirement set (wheels-<key>)."""
    cached = Entry(cache, "wheels", deps_key(requirements))
    if cached.ready() and any(cached.path().glob("*.whl")):
        say(f"dependency wheels from cache {cached.path().name}")
        return cached.path()
    with cached.publishing() as out:
        out[""].mkdir()
        _download(requirements, out[""])
    return cached.path()


def agent_wheel(checkout: Path, dest: Path) -> Path:
    """Build the tether-agent wheel of `checkout` into `dest`; return it."""
    dest.mkdir(parents=True, exist_ok=True)
    staged = agentdist.stage(checkout, dest.parent / f"{dest.name}-agent-src")
    try:
        run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
             "--wheel-dir", str(dest), str(staged)],
            what=f"building the {agentdist.NAME} wheel from this checkout (pip wheel)")
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    made = sorted(dest.glob(f"{AGENT_WHEEL_PREFIX}*.whl"))
    if len(made) != 1:
        raise BuildError(f"pip wheel made {len(made)} {AGENT_WHEEL_PREFIX}*.whl in {dest}, not one")
    return made[0]


def build(checkout: Path, dest: Path, cache: Path | None = None, say=print) -> list[Path]:
    """Fill `dest` with the tether-agent wheel and its dependencies; return the wheels.

    The agent wheel is built from the checkout every time (it is the code
    under build); the dependency wheels are cached under `cache` by their
    requirement set, so a warm build does not ask the package index again.
    """
    agent_wheel(checkout, dest)
    requirements = runtime_requirements(checkout / "pyproject.toml")
    if cache is None:
        _download(requirements, dest)
    else:
        for wheel in _dependency_wheels(requirements, cache, say).glob("*.whl"):
            shutil.copyfile(wheel, dest / wheel.name)
    return sorted(dest.glob("*.whl"))
