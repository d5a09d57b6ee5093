"""Incremental sync entry points, dispatched by directory kind.

Why a dispatcher: the OpenLDAP (accesslog) and AD (DirSync) mechanisms differ
completely, but the agent calls one function and gets the same stream shape
as a full sync: `begin`, `chunk`s of upsert/delete records, `end` + cursor.
"""

from __future__ import annotations

from typing import Iterator

from . import incremental_ad, incremental_openldap
from .config import DirectoryConfig
from .connection import Pool
from .chunking import chunked  # noqa: F401  (re-exported)
from .errors import CursorExpired  # noqa: F401  (re-exported for sync.sync)

_KINDS = {"openldap": incremental_openldap, "ad": incremental_ad}


def start_cursor(config: DirectoryConfig, conn) -> str:
    """The cursor that marks "now" on the server, read before a full sync starts."""
    return _KINDS[config.kind].start_cursor(config, conn)


def changes_since(config: DirectoryConfig, cursor: str, chunk_size: int = 500,
                  pool: Pool | None = None, remembered=None) -> Iterator[dict]:
    """Stream the changes after `cursor`; raises CursorExpired before the first item if too old.

    `remembered(group_id)`: the member list the caller last sent for a group, or
    None; the engine may use it instead of reading a large group's members again.
    """
    return _KINDS[config.kind].changes_since(config, cursor, chunk_size, pool or Pool(config),
                                             remembered)
