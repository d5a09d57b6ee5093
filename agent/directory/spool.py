"""The on-disk spool: changes wait here, in order, until home acknowledges them.

Why one file per entry: appending is write-to-temp + fsync + rename + fsync of
the directory, so an entry is either fully there or absent after a crash or
power loss, never half-written; ordering is the sequence number in the file
name, so a restarted agent sends the same entries in the same order. Entries
are removed only by `ack` (cumulative, like the channel's acknowledgements).

Sequence numbers never go back, even across restarts with an empty spool: the
highest acknowledged seq is kept in the file `acked`, because home applies
each seq exactly once and would drop a reused one as a duplicate.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Iterator

from tether.atomicfile import fsync_dir, write_atomic

NAME = re.compile(r"^(\d{16})\.json$")
ACKED = "acked"


def encode_item(item) -> bytes:
    """A spool entry's bytes: compact UTF-8 JSON, as the protocol puts it on the wire.

    Why this form (no ASCII escapes, no NaN): the drain sends the bytes home
    unchanged, and the frame budget counts them as they are.
    """
    try:
        return json.dumps(item, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode()
    except (TypeError, ValueError, UnicodeEncodeError) as exc:
        raise SpoolError(f"change cannot be stored as JSON ({exc}); this is a bug in the "
                         "directory engine's record mapping") from None


class SpoolError(Exception):
    """The spool directory cannot be used (permissions, damaged entry)."""


class Spool:
    """An ordered, durable queue of JSON-serializable dicts in `directory`."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise SpoolError(f"cannot create spool directory {self.directory}: {exc}; "
                             "give the agent a writable state directory") from None
        for leftover in self.directory.glob("*.tmp"):
            leftover.unlink()  # an append that never completed: it was never acknowledged as written
        seqs = self._seqs()
        self._next = max(seqs[-1] if seqs else 0, self._acked()) + 1

    def _acked(self) -> int:
        """The highest seq ever acknowledged here (0 if none)."""
        try:
            return int((self.directory / ACKED).read_text().strip() or 0)
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            raise SpoolError(f"spool high-water mark {self.directory / ACKED} is unreadable ({exc}); "
                             "restore it or write the highest seq home has applied into it") from None

    def _store_acked(self, seq: int) -> None:
        write_atomic(self.directory / ACKED, str(seq), mode=0o644)

    def _seqs(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.directory.iterdir() if (m := NAME.match(p.name)))

    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:016d}.json"

    def append(self, item: dict) -> int:
        """Store `item` durably; return its sequence number (only after it is on disk)."""
        return self.append_encoded(encode_item(item))

    def append_encoded(self, data: bytes) -> int:
        """Store one item already encoded as JSON (see `encode_item`); return its seq.

        Why: the follower encodes each record once to size its chunks, and the
        drain sends these bytes home as they are, so nothing is encoded twice.
        """
        seq = self._next
        try:
            write_atomic(self._path(seq), data, mode=0o644)  # durable: file and directory
        except OSError as exc:
            raise SpoolError(f"cannot write to the spool in {self.directory}: {exc.strerror or exc}; "
                             "free disk space on the data partition; the change was not stored, "
                             "so the sync must be retried") from None
        self._next = seq + 1
        return seq

    def pending(self, limit: int | None = None) -> list[tuple[int, dict]]:
        """The oldest unacknowledged entries, in order, as (seq, item)."""
        return list(self._iter(limit))

    def pending_raw(self, limit: int | None = None, after: int = 0) -> list[tuple[int, bytes]]:
        """The oldest unacknowledged entries above seq `after`, as (seq, JSON bytes).

        Why raw: the drain splices these bytes into its frame (protocol.RawJSON);
        home parses and validates them, so the agent does not decode them at all.
        """
        seqs = [s for s in self._seqs() if s > after]
        return [(seq, self._read_raw(seq)) for seq in seqs[:limit]]

    def _iter(self, limit: int | None) -> Iterator[tuple[int, dict]]:
        for n, seq in enumerate(self._seqs()):
            if limit is not None and n >= limit:
                return
            yield seq, self._read(seq)

    def _read(self, seq: int) -> dict:
        """Parse one entry (damaged: SpoolError)."""
        try:
            return json.loads(self._read_raw(seq))
        except ValueError as exc:
            raise SpoolError(f"spool entry {self._path(seq)} is unreadable ({exc}); "
                             "move it aside and let the agent run a full resync") from None

    def _read_raw(self, seq: int) -> bytes:
        """One entry's bytes; a second read before calling it damaged.

        Why the retry: an entry is renamed into place only after it is fsync'd,
        so it is never legitimately empty, but a reader in another thread was
        seen (once, under gVisor) to get empty content right after the rename.
        Only the shape is checked here (a JSON object's braces), not the content.
        """
        for attempt in range(3):
            try:
                data = self._path(seq).read_bytes().strip()
                if data[:1] == b"{" and data[-1:] == b"}":
                    return data
                error: Exception = ValueError("not a JSON object")
            except OSError as exc:
                error = exc
            time.sleep(0.01 * (attempt + 1))
        raise SpoolError(f"spool entry {self._path(seq)} is unreadable ({error}); "
                         "move it aside and let the agent run a full resync")

    def ack(self, seq: int) -> int:
        """Home has applied everything up to and including `seq`: remove it; return how many."""
        removed = 0
        if seq > self._acked():
            self._store_acked(seq)  # before removing: a crash must not let seqs go back
        for s in self._seqs():
            if s > seq:
                break
            self._path(s).unlink()
            removed += 1
        if removed:
            fsync_dir(self.directory)
        return removed

    def oldest_age(self) -> float | None:
        """Seconds the oldest unacknowledged entry has waited (None when empty)."""
        seqs = self._seqs()
        if not seqs:
            return None
        try:
            return max(0.0, time.time() - self._path(seqs[0]).stat().st_mtime)
        except OSError:
            return None

    def __len__(self) -> int:
        return len(self._seqs())

    @property
    def next_seq(self) -> int:
        return self._next
