"""Run external tools with errors that name the tool and show its output.

The pipeline drives many host tools (sfdisk, mkfs, debootstrap, chroot...);
a bare CalledProcessError hides which step failed and why, so every call
goes through `run`, which raises BuildError with the tail of stderr.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

from .errors import BuildError

_TAIL_LINES = 25


def require(tool: str, package: str) -> str:
    """Absolute path of `tool`, or a BuildError naming the Debian package."""
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if not path:
        raise BuildError(f"'{tool}' not found: install the Debian package '{package}' (make deps)")
    return path


def _tail(text: str) -> str:
    lines = text.strip().splitlines()
    return "\n".join("    " + line for line in lines[-_TAIL_LINES:])


def run(
    cmd: Sequence[str | os.PathLike],
    *,
    what: str,
    input: str | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    capture: bool = True,
) -> str:
    """Run `cmd`; return stdout; raise BuildError("`what` failed ...") on failure.

    capture=False lets the tool write straight to the terminal (progress of
    long steps such as debootstrap); the error then points at that output.
    """
    args = [str(c) for c in cmd]
    full_env = None if env is None else {**os.environ, **env}
    try:
        res = subprocess.run(
            args,
            input=input,
            text=True,
            env=full_env,
            cwd=cwd,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
        )
    except FileNotFoundError as exc:
        raise BuildError(f"{what}: '{args[0]}' not found ({exc}); run `make deps`") from exc
    if res.returncode != 0:
        detail = _tail((res.stderr or "") + (res.stdout or "")) if capture else "    (see the output above)"
        raise BuildError(f"{what} failed (exit {res.returncode}): {' '.join(args)}\n{detail}")
    return res.stdout or ""
