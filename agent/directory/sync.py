"""Full synchronization: every user and group, streamed in ordered chunks.

Why a generator of encoded messages (`tether.protocol.changes`): the agent forwards each chunk to home (through
the spool) as soon as it is ready, so memory stays flat for any directory
size; home replaces its snapshot only when it sees the `end` message. The
`end` carries the cursor from which incremental sync continues; it is taken
*before* the first page is read, so changes made during the full sync are
replayed by the next incremental sync instead of being lost.
"""

from __future__ import annotations

from typing import Iterator

from tether.protocol import changes

from . import incremental
from .config import DirectoryConfig
from .connection import Pool
from .mapping import check_mapping, search_attributes, to_record
from .search import PoolSession, paged_search

DEFAULT_CHUNK = 500


def full_sync(config: DirectoryConfig, chunk_size: int = DEFAULT_CHUNK, pool: Pool | None = None,
              reason: str | None = None) -> Iterator[dict]:
    """Yield `begin`, then `chunk`s of upsert records (users first, then groups), then `end`."""
    session = PoolSession(pool or Pool(config))
    try:
        conn = session.connection()
        check_mapping(config, conn)
        cursor = incremental.start_cursor(config, conn)
        yield changes.Begin(changes.FULL, config.name, reason).encode()
        number, count, pending = 0, 0, []
        seen: set[str] = set()
        for kind, flt in (("user", config.user_filter), ("group", config.group_filter)):
            attrs = search_attributes(config, kind)
            for base in config.base_dns:
                for page in paged_search(session, base, flt, attrs, config.page_size,
                                         f"full sync of {kind}s under {base}", raw=True):
                    for entry in page:
                        record = to_record(config, kind, entry["dn"], entry["raw_attributes"])
                        if record["id"] in seen:
                            continue  # replayed after a failover, or under two base DNs
                        seen.add(record["id"])
                        pending.append(record)
                        if len(pending) >= chunk_size:
                            number += 1
                            count += len(pending)
                            yield changes.Chunk(number, pending).encode()
                            pending = []
        if pending:
            number += 1
            count += len(pending)
            yield changes.Chunk(number, pending).encode()
        yield changes.End(changes.FULL, count, cursor, number + 1, {
            "server": session.server, "failovers": session.failovers}).encode()
    finally:
        session.close()


def sync(config: DirectoryConfig, cursor: str | None, chunk_size: int = DEFAULT_CHUNK,
         pool: Pool | None = None, remembered=None) -> Iterator[dict]:
    """Incremental from `cursor` when possible, else (or when it expired) a full sync.

    `remembered`: see incremental.changes_since."""
    if not cursor:
        yield from full_sync(config, chunk_size, pool, reason="no cursor")
        return
    try:
        stream = incremental.changes_since(config, cursor, chunk_size, pool, remembered)
        first = next(stream)
    except incremental.CursorExpired as exc:
        yield from full_sync(config, chunk_size, pool, reason=f"cursor expired: {exc.message}")
        return
    yield first
    yield from stream
