"""Offline clean-up of the provisioned disk, after the guest powered off.

The sysprep role cleans the guest while it still runs, but the clean
poweroff that follows writes again: systemd-random-seed saves a new seed
(every instance cloned from the image would then start from the same one)
and journald flushes the shutdown's messages to /var/log/journal. Neither
can be stopped from inside without breaking the appliance's own shutdowns,
so the pipeline removes them with the disk offline, then trims both file
systems so the freed blocks become holes again (smaller raw, smaller OVA).
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from . import layout as layout_mod
from .diskio import attached, mounted
from .proc import run

#: Files on root-a that the poweroff writes and that must be unique per instance.
ROOT_FILES = ("var/lib/systemd/random-seed", "var/lib/systemd/credential.secret")
#: Directories (relative to the data partition) whose files all go.
DATA_LOG_DIRS = ("log",)


def _remove_files(top: Path) -> list[str]:
    """Delete every file and symlink below `top`; directories stay."""
    removed = []
    if not top.is_dir():
        return removed
    for path in sorted(top.rglob("*")):
        if path.is_symlink() or path.is_file():
            path.unlink()
            removed.append(str(path.relative_to(top)))
    return removed


def clean(root: Path, data: Path) -> list[str]:
    """Remove the shutdown's leftovers from mounted root-a and data."""
    removed = []
    for rel in ROOT_FILES:
        path = root / rel
        if path.is_file() or path.is_symlink():
            path.unlink()
            removed.append(f"/{rel}")
    for rel in DATA_LOG_DIRS:
        removed += [f"/data/{rel}/{name}" for name in _remove_files(data / rel)]
    removed += [f"/var/log/{name}" for name in _remove_files(root / "var/log")]  # under the bind mount
    return removed


def seal(raw: Path, lay: layout_mod.Layout) -> list[str]:
    """Mount the finished disk read-write, clean it, trim it; return what went."""
    with contextlib.ExitStack() as stack:
        loop = stack.enter_context(attached(raw, len(lay.partitions)))
        mnt = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".seal-", dir=raw.parent)))
        root = stack.enter_context(mounted(loop.partition(lay.by_label("root-a").number), mnt / "root"))
        data = stack.enter_context(mounted(loop.partition(lay.by_label("data").number), mnt / "data"))
        removed = clean(root, data)
        for fs in (root, data):
            run(["fstrim", str(fs)], what=f"trimming {fs.name}")
        return removed
