"""Records grouped into numbered `chunk` messages (shared by full and incremental sync).

Why its own module: the incremental engines need it and the dispatcher in
incremental.py imports them, so keeping it there made an import cycle.
"""

from __future__ import annotations

from typing import Iterator


def chunked(records, chunk_size: int, first_seq: int = 1) -> Iterator[dict]:
    """Group records into numbered `chunk` messages."""
    seq, pending = first_seq, []
    for record in records:
        pending.append(record)
        if len(pending) >= chunk_size:
            yield {"type": "chunk", "seq": seq, "changes": pending}
            seq, pending = seq + 1, []
    if pending:
        yield {"type": "chunk", "seq": seq, "changes": pending}
