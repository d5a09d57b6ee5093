"""Near-real-time change notification: wake the sync as soon as the directory changes.

Why notifications only *trigger* an incremental sync instead of carrying the
change: the incremental sync already produces ordered, state-based records
with a cursor, so a lost or duplicated notification can never corrupt home's
store; it only makes the next sync come sooner.

- AD / Samba: Microsoft persistent search (LDAP_SERVER_NOTIFICATION_OID) over
  an ldap3 ASYNC_STREAM connection.
- OpenLDAP: RFC 4533 content sync (refreshAndPersist) on cn=accesslog, so
  every write logged after we start is pushed to us (syncprov on the log db).

A watchdog thread reconnects (to the next pool server) when the connection
drops and signals `reconnected`, so the caller re-syncs what it may have missed.
"""

from __future__ import annotations

import datetime
import threading
from typing import Callable

import ldap3
from ldap3.protocol.microsoft import persistent_search_control

from .config import DirectoryConfig
from .connection import Pool, discard
from .errors import DirectoryError

SYNC_REQUEST_OID = "1.3.6.1.4.1.4203.1.9.1.1"
REFRESH_AND_PERSIST = bytes.fromhex("30030a0103")  # SEQUENCE { mode ENUMERATED 3 }
SHOW_DELETED_OID = "1.2.840.113556.1.4.417"


class ChangeNotifier:
    """Calls `on_change(event_dict)` from a background thread for every directory write."""

    def __init__(self, config: DirectoryConfig, on_change: Callable[[dict], None],
                 pool: Pool | None = None, check_interval: float = 0.5):
        self.config = config
        self.on_change = on_change
        self.pool = pool or Pool(config)
        self.check_interval = check_interval
        self.conn: ldap3.Connection | None = None
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.last_error: DirectoryError | None = None

    # --- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        """Subscribe now (raises DirectoryError if no server works) and keep it subscribed."""
        self._subscribe()
        self._watchdog = threading.Thread(target=self._watch, name=f"notify-{self.config.name}", daemon=True)
        self._watchdog.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout=5)
        self._close()

    @property
    def server(self) -> str:
        return str(self.config.servers[self.pool.current])

    # --- internals ---------------------------------------------------------------
    def _event(self, message: dict) -> None:
        if message.get("type") != "searchResEntry":
            return  # sync info / intermediate responses carry no entry
        attrs = message.get("attributes") or {}
        dn = attrs.get("reqDN") or message.get("dn")  # OpenLDAP: the changed entry, not the log record
        if isinstance(dn, list):
            dn = dn[0] if dn else None
        try:
            self.on_change({"directory": self.config.name, "dn": dn, "server": self.server})
        except Exception:  # a failing consumer must not kill the listener thread
            pass

    def _request(self) -> tuple[str, str, list]:
        """(base, filter, controls) of the persistent search for this directory kind."""
        if self.config.kind == "ad":
            # the naming context root with Show Deleted: deletions are notified too
            # (they move to CN=Deleted Objects, outside any narrower base)
            probe = self.pool.connect()
            try:
                probe.search("", "(objectClass=*)", search_scope=ldap3.BASE, attributes=["defaultNamingContext"])
                base = probe.response[0]["raw_attributes"]["defaultNamingContext"][0].decode()
            finally:
                probe.unbind()
            return base, "(objectClass=*)", [persistent_search_control(), (SHOW_DELETED_OID, True, None)]
        # reqStart's fraction is a per-second counter, not microseconds: start at the
        # previous whole second (a spurious early wake-up is harmless, a missed one is not)
        since = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=1)
        flt = f"(&(objectClass=auditWriteObject)(reqResult=0)(reqStart>={since.strftime('%Y%m%d%H%M%S')}.000000Z))"
        return "cn=accesslog", flt, [(SYNC_REQUEST_OID, True, REFRESH_AND_PERSIST)]

    def _subscribe(self) -> None:
        base, flt, controls = self._request()
        self.conn = self.pool.connect(strategy=ldap3.ASYNC_STREAM)
        strategy = self.conn.strategy
        strategy.streaming, strategy.callback = False, self._event
        with strategy.async_lock:
            msg_id = self.conn.search(base, flt, search_scope=ldap3.SUBTREE, attributes=["reqDN"],
                                      dereference_aliases=ldap3.DEREF_NEVER, controls=controls)
            strategy.persistent_search_message_id = msg_id

    def _alive(self) -> bool:
        return self.conn is not None and not self.conn.closed and bool(getattr(self.conn, "listening", True))

    def _close(self) -> None:
        if self.conn is not None:
            discard(self.conn)  # joins ldap3's receiver thread before the socket is closed
        self.conn = None

    def _watch(self) -> None:
        while not self._stop.wait(self.check_interval):
            if self._alive():
                continue
            self._close()
            try:
                self._subscribe()
            except DirectoryError as exc:
                self.last_error = exc
                continue
            self.last_error = None
            try:
                self.on_change({"directory": self.config.name, "reconnected": True, "server": self.server})
            except Exception:
                pass
