"""Change notifications against real servers: slapd (content sync on the accesslog), Samba (persistent search)."""

from __future__ import annotations

import queue

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
