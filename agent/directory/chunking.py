"""Records grouped into numbered `chunk` messages (shared by full and incremental sync).

Why its own module: the incremental engines need it and the dispatcher in
incremental.py imports them, so keeping it there made an import cycle.
"""

from __future__ import annotations

from typing import Iterator

from tether.protocol import changes


def chunked(records, chunk_size: int, first_number: int = 1) -> Iterator[dict]:
    """Group records into `chunk` messages numbered from `first_number` (encoded)."""
    number, pending = first_number, []
    for record in records:
        pending.append(record)
        if len(pending) >= chunk_size:
            yield changes.Chunk(number, pending).encode()
            number, pending = number + 1, []
    if pending:
        yield changes.Chunk(number, pending).encode()
