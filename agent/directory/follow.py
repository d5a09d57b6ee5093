"""Keep one directory's changes flowing into the spool, near real time.

Why here and not in the channel code: the loop "sync from the stored cursor,
spool every message, then store the new cursor" is what makes an interruption
(agent restart, home away, lost server) lose nothing, and it needs only the
engine and the spool. The channel drains the spool and acks what home applied.

The cursor is stored (atomically, fsync'd) only after the stream's `end` is in
the spool, so a crash mid-stream replays that stream: records are whole states,
so replaying is harmless; a replayed full sync starts with a new `begin`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from tether.atomicfile import write_atomic

from .errors import DirectoryError
from .service import DirectoryService
from .spool import Spool


class CursorFile:
    """The last cursor whose stream is completely in the spool."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def load(self) -> str | None:
        try:
            return self.path.read_text().strip() or None
        except FileNotFoundError:
            return None

    def store(self, cursor: str) -> None:
        write_atomic(self.path, cursor, mode=0o644)


class Follower:
    """Sync at start, then on every change notification and every `interval` seconds."""

    def __init__(self, service: DirectoryService, spool: Spool, state_dir: str | os.PathLike,
                 interval: float = 300.0):
        self.service, self.spool, self.interval = service, spool, interval
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        self.cursor = CursorFile(Path(state_dir) / f"{service.name}.cursor")
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._notifier = None
        self.last_error: DirectoryError | None = None

    def run_once(self) -> int:
        """One sync from the stored cursor into the spool; returns the number of records spooled."""
        count = 0
        for msg in self.service.sync(self.cursor.load()):
            self.spool.append(msg)
            if msg["type"] == "chunk":
                count += len(msg["changes"])
            elif msg["type"] == "end":
                self.cursor.store(msg["cursor"])
        return count

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"follow-{self.service.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._notifier is not None:
            self._notifier.stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._notifier is None:
                try:
                    self._notifier = self.service.watch(lambda event: self._wake.set())
                except DirectoryError as exc:
                    self.last_error = exc  # no notifications for now: the interval still syncs
            self._wake.clear()
            try:
                self.run_once()
                self.last_error = None
            except DirectoryError as exc:
                self.last_error = exc
            self._wake.wait(self.interval)
