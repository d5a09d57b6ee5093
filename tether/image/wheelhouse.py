"""The wheelhouse the agent role installs from (the guest has no network).

It holds the wheel of this checkout plus binary wheels of the appliance's
runtime dependencies (websockets, cryptography, psutil and theirs) for the
guest: CPython 3.11 on x86_64 glibc (Debian 12). The dependencies are
fetched with explicit target tags, so the build machine's own Python may
differ from the guest's without putting an unusable wheel into the image.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from .errors import BuildError
from .proc import run

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


def build(checkout: Path, dest: Path) -> list[Path]:
    """Fill `dest` with the tether wheel and its dependencies; return the wheels."""
    dest.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
         "--wheel-dir", str(dest), str(checkout)],
        what="building the tether wheel from this checkout (pip wheel)")
    try:
        run(download_args(runtime_requirements(checkout / "pyproject.toml"), dest),
            what="fetching the runtime dependency wheels for the guest (pip download)")
    except BuildError as exc:
        raise BuildError(f"{exc}\n    check that PyPI (or the pip index configured here) is reachable") from exc
    wheels = sorted(dest.glob("*.whl"))
    if not any(w.name.startswith("tether-") for w in wheels):
        raise BuildError(f"pip wheel made no tether-*.whl in {dest}")
    return wheels
