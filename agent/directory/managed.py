"""One configured directory as the agent runs it: engine, spool, cursor, follower, `leading`.

Why a separate object per directory: a directory whose configuration is
refused, whose server is down or whose follower fails must not disturb the
others, and a new configuration must replace one directory's engine without
losing its spool. Everything lives under `<state>/directories/<id>/`:

- `spool/`   changes waiting for home's acknowledgement (see spool.py)
- `cursor`   the last cursor whose stream is completely in the spool
- `leading`  present while home wants this agent to follow the directory, so
             an agent restarted while home is away keeps following it (the
             changes wait in the spool until home is back)
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tether.atomicfile import write_atomic
from tether import protocol as p

from .deltas import MemberMemory
from .errors import DirectoryConfigError, DirectoryError
from .follow import CursorFile, Follower
from .service import DirectoryService
from .spool import Spool, encode_item

log = logging.getLogger("tether.agent.directory")

#: A directory id names a directory on disk: keep it to a safe file name.
ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
#: Largest spool entry (encoded JSON) the follower writes; a drain batch holds two.
#: Why this large: every append, read and ack is a few syscalls that hand the GIL
#: to another thread; fewer, larger entries keep the follower's LDAP reads moving.
ENTRY_BUDGET = 500 * 1024
#: Configuration keys that change the records themselves: a change forces a full resync.
SHAPING_KEYS = ("kind", "base_dns", "user_filter", "group_filter", "attribute_mapping",
                "member_attribute", "sync_password_hashes")
#: Seconds between syncs when no change notification arrives (also the retry after an error).
FOLLOW_INTERVAL = 60.0


def encoded_size(obj) -> int:
    """Bytes of `obj` as the protocol encodes it (compact UTF-8 JSON)."""
    return len(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode())


def split_by_size(items: Iterable, budget: int) -> Iterator[list]:
    """Consecutive groups of `items` whose encoded list stays under `budget` bytes.

    A single item above the budget still forms a group of its own: it cannot be
    split without changing what home receives, so the caller reports it.
    """
    group, size = [], 2
    for item in items:
        n = encoded_size(item) + 1
        if group and size + n > budget:
            yield group
            group, size = [], 2
        group.append(item)
        size += n
    if group:
        yield group


def rechunk(stream: Iterable[dict], budget: int = ENTRY_BUDGET) -> Iterator[dict]:
    """The engine's stream with every chunk small enough for one spool entry."""
    return (msg for msg, _ in spool_entries(stream, budget))


def spool_entries(stream: Iterable[dict], budget: int = ENTRY_BUDGET) -> Iterator[tuple[dict, bytes]]:
    """(message, its spool bytes) for the engine's stream, each chunk within `budget`.

    Why encode here: every record has to be encoded once anyway to size the
    chunks; the entry's bytes are those encodings joined, so the spool (and
    the drain, which sends the bytes as they are) never encodes a record again.
    Why renumber: home checks that chunk seqs run 1, 2, ... and that `end.seq`
    follows the last chunk, so splits shift every later seq of the stream.
    """
    seq = 0
    for msg in stream:
        if msg.get("type") == "chunk":
            encoded = [encode_item(change) for change in msg["changes"]]
            for lo, hi in _size_groups([len(e) for e in encoded], budget):
                seq += 1
                part = {**msg, "seq": seq, "changes": msg["changes"][lo:hi]}
                data = _chunk_bytes(part, encoded[lo:hi])
                if len(data) <= budget:
                    yield part, data
                else:  # one record larger than an entry (a very large group): in parts
                    yield from _in_parts(part, data)
        else:
            if msg.get("type") == "end":
                msg = {**msg, "seq": seq + 1}
            else:
                seq = 0
            yield msg, encode_item(msg)


def _in_parts(msg: dict, data: bytes) -> Iterator[tuple[dict, bytes]]:
    """A chunk too large for one spool entry as `part` entries (tether.protocol.parts).

    Why at the spool: each part gets its own seq, so the drain sends and home
    applies it exactly once like any entry; home applies the chunk at its last part.
    """
    try:
        parts = p.split_parts(data)
    except ValueError as exc:
        record = msg["changes"][0] if msg["changes"] else {}
        raise DirectoryError("too_large", f"the {record.get('kind', 'entry')} {record.get('dn')!r} "
                             f"cannot be sent home: {exc}") from None
    for part in parts:
        message = part.to_message()
        yield message, encode_item(message)


def _size_groups(sizes: list[int], budget: int) -> Iterator[tuple[int, int]]:
    """Index ranges [lo, hi) whose JSON list (items + commas + brackets) fits `budget`;
    one item above the budget forms a range of its own (the drain reports it)."""
    lo, size = 0, 2
    for i, n in enumerate(sizes):
        if i > lo and size + n + 1 > budget:
            yield lo, i
            lo, size = i, 2
        size += n + 1
    if lo < len(sizes):
        yield lo, len(sizes)


def _chunk_bytes(msg: dict, encoded: list[bytes]) -> bytes:
    """`msg` as JSON with its `changes` list spliced from already encoded records."""
    head = encode_item({k: v for k, v in msg.items() if k != "changes"})
    sep = b"," if len(head) > 2 else b""
    return head[:-1] + sep + b'"changes":[' + b",".join(encoded) + b"]}"


class NotifyingSpool(Spool):
    """A spool that calls `on_append()` after each durable append (wakes the drain)."""

    def __init__(self, directory, on_append: Callable[[], None]):
        super().__init__(directory)
        self.on_append = on_append

    def append_encoded(self, data: bytes) -> int:
        seq = super().append_encoded(data)
        self.on_append()
        return seq


class BridgeFollower(Follower):
    """The engine's Follower, with size-bounded spool entries, a stop between messages
    and an optional full sync first (home's `sync` mode `full`)."""

    def __init__(self, service: DirectoryService, spool: Spool, root: Path, full: bool = False,
                 ident: str | None = None):
        super().__init__(service, spool, root, interval=FOLLOW_INTERVAL)
        self.cursor = CursorFile(root / "cursor")
        self.full = full
        self.ident = ident or service.name  # home's key for the directory (not its display name)
        #: (code, message) of the error last spooled for home; None after a good `end`
        self.reported: tuple[str, str] | None = None
        #: large groups' member lists as spooled by this follower (member deltas)
        self.members = MemberMemory()

    def run_once(self) -> int:
        """One sync into the spool; a failure is spooled for home, then re-raised for the retry."""
        try:
            return self._attempt()
        except DirectoryError as exc:
            self._report(exc)
            raise

    def _attempt(self) -> int:
        """One sync; any failure becomes a DirectoryError the loop retries.

        Why wrap: the engine's loop retries DirectoryError only, and a full disk
        (SpoolError) or an unexpected ldap3 error must not end the thread silently.
        """
        try:
            return self._sync_into_spool()
        except DirectoryError:
            raise
        except Exception as exc:
            log.exception("following %s failed", self.service.name)
            raise DirectoryError("operation_failed", f"following stopped by {type(exc).__name__}: "
                                 f"{exc}; retrying") from None

    def _report(self, exc: DirectoryError) -> None:
        """Spool an `error` message for home, once per distinct failure.

        Why through the spool: home sees it in order with the data (a later
        `end` clears it) and even when it was away while the sync failed.
        Why once: a server down for a day must not fill the spool with retries.
        """
        key = (exc.code, exc.message)
        if key == self.reported or self._stop.is_set():
            return
        try:
            self.spool.append(error_message(self.ident, exc))
        except Exception:  # noqa: BLE001 - a full disk: the status still says why
            log.exception("spooling the error of %s failed", self.service.name)
            return
        self.reported = key
        log.warning("following %s failed: %s", self.service.name, exc,
                    extra={"tether_directory": self.service.name, "tether_error": exc.code})

    def _sync_into_spool(self) -> int:
        """One stream into the spool; the member memory survives only complete attempts."""
        try:
            return self._stream_into_spool()
        except BaseException:
            self.members.forget()  # entries of this attempt may be missing: no deltas on it
            raise

    def _stream_into_spool(self) -> int:
        stream = self.service.full_sync() if self.full else \
            self.service.sync(self.cursor.load(), remembered=self.members.groups.get)
        count = 0
        for msg, data in spool_entries(self.members.stream(stream)):
            if self._stop.is_set():
                self.members.forget()
                return count  # abandoned mid-stream: the cursor is not stored, so it replays
            self.spool.append_encoded(data)
            if msg["type"] == "chunk":
                count += len(msg["changes"])
            elif msg["type"] == p.PART_TYPE and msg["index"] == msg["count"] - 1:
                count += 1
            elif msg["type"] == "end":
                self.cursor.store(msg["cursor"])
                self.full = False
                self.reported = None  # home clears its error on this end
        return count


def error_message(directory: str, exc: DirectoryError) -> dict:
    """The stream's `error` message: why following `directory` failed, for home's status."""
    fields = exc.to_dict()
    code, message = fields.pop("code"), fields.pop("message")
    return p.changes.Error(code, message, at=time.time(),
                           extra={"directory": directory, **fields}).encode()


def refusal(ident: str, exc: Exception) -> DirectoryError:
    """Any failure to build a directory's engine as a DirectoryError (code `config` if unknown)."""
    if isinstance(exc, DirectoryError):
        return exc
    return DirectoryConfigError(f"directory {ident!r} cannot be set up: {type(exc).__name__}: {exc}")


class ManagedDirectory:
    """A directory's engine plus its on-disk state; `error` is set when its config was refused."""

    def __init__(self, ident: str, raw: dict, root: Path, spool: Spool):
        self.id, self.raw, self.root, self.spool = ident, raw, root, spool
        self.cursor = CursorFile(root / "cursor")
        self.follower: BridgeFollower | None = None
        self._auth_threads: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()  # follow/stop/close come from several worker threads
        self.retired = False
        self.service: DirectoryService | None = None
        self.error: DirectoryError | None = None
        try:
            self.service = DirectoryService({**raw, "name": raw.get("name") or ident})
        except Exception as exc:  # noqa: BLE001 - one bad directory must not stop the others
            self.error = refusal(ident, exc)
            log.error("directory %s refused: %s", ident, self.error,
                      extra={"tether_directory": ident, "tether_error": self.error.code})

    # ---- leading marker

    @property
    def leading(self) -> bool:
        return (self.root / "leading").exists()

    def set_leading(self, on: bool) -> None:
        marker = self.root / "leading"
        if on and not marker.exists():
            write_atomic(marker, b"home asked this agent to follow the directory\n")
        elif not on:
            marker.unlink(missing_ok=True)

    # ---- following (blocking: call from a worker thread, never the event loop)

    @property
    def following(self) -> bool:
        return self.follower is not None

    def follow(self, home_cursor: str | None, full: bool = False) -> None:
        """Start following (no-op if already following, unless `full` restarts it).

        Home's cursor is used only when this agent holds neither a cursor nor
        unsent changes of its own: ours are newer, or not yet applied by home.
        """
        with self._lock:
            if self.retired:
                raise DirectoryError("config", f"directory {self.id!r} was reconfigured meanwhile; "
                                     "send the request again")
            if self.service is None:
                raise self.error
            if self.follower is not None and not full:
                return
            self._stop_following()
            if full:
                self.forget_cursor()  # an agent restarted mid-way starts the full sync again
            elif home_cursor and self.cursor.load() is None and len(self.spool) == 0:
                self.cursor.store(home_cursor)
            self.follower = BridgeFollower(self.service, self.spool, self.root, full=full, ident=self.id)
            self.follower.start()

    def report_refusal(self) -> None:
        """Spool the refused configuration's error for home (this agent leads the directory).

        Why: home sends `sync follow` only when the leader changes, so a leader
        whose new configuration is refused would otherwise stay silent.
        """
        try:
            self.spool.append(error_message(self.id, self.error))
        except Exception:  # noqa: BLE001 - a full disk: the agent's status still says why
            log.exception("spooling the refusal of directory %s failed", self.id)

    def stop_following(self) -> None:
        with self._lock:
            self._stop_following()

    def _stop_following(self) -> None:
        follower, self.follower = self.follower, None
        if follower is not None:
            follower.stop()

    def forget_cursor(self) -> None:
        """The records' shape changed (mapping, filters, base DNs): the next sync is full."""
        self.cursor.path.unlink(missing_ok=True)

    def auth_threads(self) -> ThreadPoolExecutor:
        """The threads that check this directory's logins: as many as its AuthPool holds.

        Why its own executor: logins block in ldap3; on asyncio's default executor
        (a handful of threads on a small appliance, shared with syncs and
        provisioning) they would wait behind one another and behind a full sync,
        and a pool wider than that executor would never be used.
        """
        with self._lock:
            if self.retired:
                raise DirectoryError("config", f"directory {self.id!r} was reconfigured meanwhile; "
                                     "send the request again")
            if self._auth_threads is None:
                size = self.service.config.auth_connections if self.service else 1
                self._auth_threads = ThreadPoolExecutor(max_workers=size,
                                                        thread_name_prefix=f"auth-{self.id}")
            return self._auth_threads

    def close(self) -> None:
        """Stop following and release connections; the state on disk stays."""
        with self._lock:
            self.retired = True
            self._stop_following()
            if self._auth_threads is not None:
                self._auth_threads.shutdown(wait=False)  # logins under way finish on their own
            if self.service is not None:
                self.service.close()

    def status(self) -> dict:
        """What a `sync` reply and the agent's status report say about this directory."""
        out = {"cursor": self.cursor.load(), "following": self.following, "pending": len(self.spool)}
        failure = self.follower.last_error if self.follower is not None else self.error
        if failure is not None:
            out["error"] = failure.to_dict()
        return out


def shaping_changed(old: dict, new: dict) -> bool:
    return any(old.get(k) != new.get(k) for k in SHAPING_KEYS)
