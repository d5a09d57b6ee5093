"""One build at a time per images/ directory.

Two builds would share the base-disk cache and the home state, and two TCG
guests on a 2-core machine make both crawl, so a build holds an exclusive
flock on images/.build.lock. The file records who holds it; flock itself is
released by the kernel when the holder dies, so a lock left by a crashed
build is detected (the recorded PID no longer runs) and taken over with a
message instead of blocking every later build.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import BuildError

LOCK_NAME = ".build.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_owner(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


@dataclass
class BuildLock:
    """Context manager around the flock; `stale_owner` is set on takeover."""

    images_dir: Path
    name: str | None = None
    stale_owner: dict | None = None
    _fd: int | None = None

    @property
    def path(self) -> Path:
        return self.images_dir / LOCK_NAME

    def acquire(self) -> "BuildLock":
        previous = _read_owner(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            owner = _read_owner(self.path)
            raise BuildError(
                f"another image build holds {self.path} (pid {owner.get('pid', '?')}, "
                f"name {owner.get('name', '?')}, started {owner.get('started', '?')}): "
                "wait for it to finish or stop that process; builds share images/.cache"
            ) from None
        pid = previous.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid):
            self.stale_owner = previous
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "name": self.name,
        }).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "BuildLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def stale_message(self) -> str | None:
        if not self.stale_owner:
            return None
        return (f"found a stale lock from pid {self.stale_owner.get('pid')} "
                f"(started {self.stale_owner.get('started', '?')}, no longer running): taking it over")
