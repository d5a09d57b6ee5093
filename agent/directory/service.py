"""One configured directory, as the agent sees it: the call boundary for home's requests.

Why a facade: the channel code (agent/, home/) should not know about pools,
cursors or ldap3. It builds one DirectoryService per directory from the
configuration dict home pushed (bind password already unsealed, in memory) and
maps each request to one method; every result is a plain dict, every failure a
DirectoryError whose `to_dict()` goes back as the error reply.
"""

from __future__ import annotations

from typing import Callable, Iterator

from . import lookup, sync as syncing
from .auth import AuthPool
from .config import load_config
from .connection import Pool
from .notify import ChangeNotifier
from .provision import provision


class DirectoryService:
    """Sync, authenticate, provision, search and watch one directory."""

    def __init__(self, raw_config: dict):
        self.config = load_config(raw_config)
        self.pool = Pool(self.config)
        self._auth = AuthPool(self.config, self.pool)

    @property
    def name(self) -> str:
        return self.config.name

    def sync(self, cursor: str | None = None, chunk_size: int = syncing.DEFAULT_CHUNK,
             remembered=None) -> Iterator[dict]:
        """begin / chunk... / end(cursor): incremental from `cursor`, else (or if expired) full.

        `remembered(group_id)`: member lists the caller sent (see incremental.changes_since)."""
        return syncing.sync(self.config, cursor, chunk_size, self.pool, remembered)

    def full_sync(self, chunk_size: int = syncing.DEFAULT_CHUNK) -> Iterator[dict]:
        return syncing.full_sync(self.config, chunk_size, self.pool, reason="requested")

    def authenticate(self, username: str, password: str, with_groups: bool = True) -> dict:
        return self._auth.authenticate(username, password, with_groups)

    def provision(self, order: dict) -> dict:
        return provision(self.config, order, self.pool)

    def search(self, kind: str, extra_filter: str | None = None, limit: int = 100) -> dict:
        return lookup.search(self.config, kind, extra_filter, limit, self.pool)

    def watch(self, on_change: Callable[[dict], None]) -> ChangeNotifier:
        """Start change notifications; the caller runs `sync(cursor)` on each event and stops it."""
        notifier = ChangeNotifier(self.config, on_change, Pool(self.config))
        notifier.start()
        return notifier

    def close(self) -> None:
        self._auth.close()
