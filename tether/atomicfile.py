"""Files replaced whole: a reader sees the old content or the new, never half of one.

Why one module for the agent, home and the image build: the same three steps
(write beside the target, rename over it, remove the temporary file on any
failure) were written out about twenty times, and each copy forgot a different
one (no clean-up on error, a fixed temporary name two writers share, no fsync
where a power cut matters). ``durable`` adds the fsyncs of the file and of its
directory, so that the rename itself survives a hard power-off (an appliance VM
is switched off without warning); the build's outputs, which a rerun remakes,
skip them.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def write_atomic(path: Path, data: bytes | str, mode: int = 0o600, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` (text is UTF-8) atomically, with file ``mode``."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with replacing(path, mode=mode, durable=durable) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())


@contextlib.contextmanager
def replacing(path: Path, mode: int | None = None, durable: bool = False) -> Iterator[Path]:
    """A fresh temporary path beside ``path`` for the caller (or a tool it runs) to
    fill; when the block ends without an error it replaces ``path`` (with ``mode``
    if given), otherwise it is removed and ``path`` is untouched.

    The name is unique (several writers may race) and hidden (``.name.…tmp``) in
    the same directory, so the rename is atomic on that file system.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or create in ``directory`` durable."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
