"""Change notifications against real servers: slapd (content sync on the accesslog), Samba (persistent search)."""

from __future__ import annotations

import queue
import socket
import struct
import threading

import ldap3
import pytest

from ldapfix_helpers import ad_user, admin_connection, slapd_config
from ldapfix_slapd import SUFFIX, user_ldif
from tether.agent.directory.config import load_config
from tether.agent.directory.notify import ChangeNotifier

WAIT = 15  # generous upper bound for a loaded machine; not a speed assertion


def wait_for(events: queue.Queue, predicate) -> dict:
    seen = []
    while True:
        try:
            event = events.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"no matching notification; saw {seen}") from None
        seen.append(event)
        if predicate(event):
            return event


def test_openldap_write_is_notified_and_reconnect_fails_over(slapd_factory, test_ca):
    data = user_ldif("nina", "pw", entryUUID="11111111-2222-3333-4444-555555555555")
    primary, secondary = slapd_factory("np", data), slapd_factory("ns", data)
    raw = slapd_config(primary, test_ca)
    raw["servers"] = [f"localhost:{primary.tls_port}", f"localhost:{secondary.tls_port}"]
    events: queue.Queue = queue.Queue()
    notifier = ChangeNotifier(load_config(raw), events.put, check_interval=0.1)
    notifier.start()
    try:
        admin = admin_connection(primary, test_ca)
        dn = f"uid=nina,ou=people,{SUFFIX}"
        assert admin.modify(dn, {"mail": [(ldap3.MODIFY_REPLACE, ["n@example.com"])]})
        assert wait_for(events, lambda e: e.get("dn") == dn)["server"] == f"localhost:{primary.tls_port}"
        admin.unbind()
        primary.stop()
        event = wait_for(events, lambda e: e.get("reconnected"))
        assert event["server"] == f"localhost:{secondary.tls_port}"
        admin2 = admin_connection(secondary, test_ca)
        assert admin2.delete(dn)
        wait_for(events, lambda e: e.get("dn") == dn)
    finally:
        notifier.stop()


@pytest.mark.slow
def test_ad_persistent_search_notifies(ad_raw, ad_admin):
    events: queue.Queue = queue.Queue()
    notifier = ChangeNotifier(load_config(ad_raw), events.put)
    notifier.start()
    try:
        dn = ad_user(ad_admin, "notified")
        wait_for(events, lambda e: (e.get("dn") or "").lower() == dn.lower())
        assert ad_admin.delete(dn)
        wait_for(events, lambda e: "notified" in (e.get("dn") or "").lower() and "DEL:" in e.get("dn", ""))
    finally:
        notifier.stop()


class ResettingRelay:
    """A TCP relay in front of a server that can end every relayed connection with an RST.

    Why: a server that crashes, a firewall that drops state or a load balancer that
    fails over ends the notifier's connection with a reset, not an orderly close.
    """

    def __init__(self, port: int):
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.clients: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.clients.append(client)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.close()
            except OSError:
                pass

    def reset_all(self) -> int:
        """Abort every relayed client connection with an RST (SO_LINGER 0); how many there were."""
        clients = [c for c in self.clients if c.fileno() != -1]  # skip the ones already closed
        self.clients = []
        for client in clients:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
        return len(clients)

    def close(self) -> None:
        self.listener.close()
        self.reset_all()


def test_a_reset_connection_is_noticed_and_resubscribed(slapd_factory, test_ca):
    """A connection reset (not an orderly close) must end the subscription, not leave it deaf.

    ldap3's receiver thread, with a receive timeout set, treats every socket error
    as a timeout and reads again: after a reset it spun forever and the notifier
    never noticed its connection was gone (the flake of the failover test above).
    """
    data = user_ldif("rita", "pw", entryUUID="11111111-2222-3333-4444-666666666666")
    server = slapd_factory("rr", data)
    relay = ResettingRelay(server.tls_port)
    raw = slapd_config(server, test_ca)
    raw["servers"] = [f"localhost:{relay.port}"]
    events: queue.Queue = queue.Queue()
    notifier = ChangeNotifier(load_config(raw), events.put, check_interval=0.1)
    notifier.start()
    try:
        assert relay.reset_all() == 1
        wait_for(events, lambda e: e.get("reconnected"))
        admin = admin_connection(server, test_ca)
        dn = f"uid=rita,ou=people,{SUFFIX}"
        assert admin.modify(dn, {"mail": [(ldap3.MODIFY_REPLACE, ["r@example.com"])]})
        wait_for(events, lambda e: e.get("dn") == dn)
        admin.unbind()
    finally:
        notifier.stop()
        relay.close()
