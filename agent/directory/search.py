"""Paged search that survives losing its server.

Why: a full sync of 100,000 entries takes long enough for the primary to go
away. A paged-results cookie is only valid on the server that issued it, so on
failover the search restarts on the next server and the caller skips ids it
has already emitted: nothing is missing and nothing is sent twice.
"""

from __future__ import annotations

from typing import Iterator

import ldap3

from . import ranges
from .connection import DOWN_ERRORS, Pool, check_result
from .errors import DirectoryError

PAGED_OID = "1.2.840.113556.1.4.319"


class PoolSession:
    """A pool plus its current bound service connection, reconnected on failure."""

    def __init__(self, pool: Pool):
        self.pool = pool
        self.conn: ldap3.Connection | None = None
        self.failovers = 0

    def connection(self) -> ldap3.Connection:
        if self.conn is None or self.conn.closed:
            self.conn = self.pool.connect()
        return self.conn

    def failover(self) -> ldap3.Connection:
        self.close()
        self.failovers += 1
        self.conn = self.pool.failover()
        return self.conn

    @property
    def server(self) -> str:
        return str(self.pool.config.servers[self.pool.current])

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.unbind()
            except Exception:  # the server may be gone already
                pass
        self.conn = None


def paged_search(session: PoolSession, base: str, search_filter: str, attributes: list[str],
                 page_size: int, what: str, scope=ldap3.SUBTREE, raw: bool = False,
                 controls: list | None = None) -> Iterator[list[dict]]:
    """Yield pages (lists of ldap3 response entries); restart on another server if one dies.

    After a restart, pages start again from the first entry: callers dedupe by id.
    `raw`: the caller reads only `dn` and `raw_attributes` (plain dicts, values
    as bytes) of the entries, so they take wire.FastSyncStrategy's fast path.
    `controls`: more request controls (ldap3 tuples) beside the paging one.
    """
    cookie = None
    while True:
        conn = session.connection()
        conn.strategy.raw_entries = raw
        try:
            conn.search(base, search_filter, search_scope=scope, attributes=attributes,
                        paged_size=page_size, paged_cookie=cookie, controls=controls)
        except DOWN_ERRORS:
            session.failover()
            cookie = None
            continue
        except ldap3.core.exceptions.LDAPException as exc:
            raise DirectoryError("operation_failed", f"{what}: {exc}", session.server) from None
        finally:
            conn.strategy.raw_entries = False
        res = conn.result or {}
        if res.get("result") in (51, 52, 80):  # busy / unavailable / other: treat as down
            session.failover()
            cookie = None
            continue
        if res.get("result") == 32:  # noSuchObject: the base DN does not exist
            raise DirectoryError("config", f"{what}: base DN {base!r} does not exist on {session.server}")
        check_result(conn, what)
        entries = [r for r in conn.response if r.get("type") == "searchResEntry"]
        control = (res.get("controls") or {}).get(PAGED_OID) or {}
        cookie = (control.get("value") or {}).get("cookie")
        for entry in entries:  # after the cookie: these reads replace conn.result
            if ranges.is_ranged(entry):
                ranges.complete(conn, entry, session.pool.config.member_range_size)
        yield entries
        if not cookie:
            return
