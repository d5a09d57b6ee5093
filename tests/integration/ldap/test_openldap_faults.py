"""Bad input and faults against a real slapd: each a clear, coded error; pool failover."""

from __future__ import annotations

import uuid

import pytest

from ldapfix_helpers import slapd_config
from ldapfix_slapd import LIMITED_DN, LIMITED_PW, SUFFIX, free_port, ssha, user_ldif
from tether.agent.directory.auth import authenticate
from tether.agent.directory.config import load_config
from tether.agent.directory.errors import DirectoryError
from tether.agent.directory.provision import provision
from tether.agent.directory.sync import full_sync


def error_of(raw: dict, run=lambda c: list(full_sync(c))) -> DirectoryError:
    with pytest.raises(DirectoryError) as info:
        run(load_config(raw))
    return info.value


def test_wrong_bind_password(ldap_raw):
    ldap_raw["bind_password"] = "wrong"
    err = error_of(ldap_raw)
    assert err.code == "bind_failed" and "invalid credentials" in err.message
    assert "bind DN and password" in err.hint


def test_server_down(ldap_raw):
    ldap_raw["servers"] = [f"localhost:{free_port()}"]
    err = error_of(ldap_raw)
    assert err.code == "server_down" and "cannot connect" in err.message


def test_tls_name_mismatch(ldap_raw, slapd):
    ldap_raw["servers"] = [f"127.0.0.1:{slapd.tls_port}"]  # certificate names only localhost
    err = error_of(ldap_raw)
    assert err.code == "tls" and "does not name '127.0.0.1'" in err.message, err


def test_tls_with_the_wrong_ca(ldap_raw, tmp_path):
    from ldapfix_ca import make_ca
    ldap_raw["ca_file"] = str(make_ca(tmp_path / "other").ca_file)
    err = error_of(ldap_raw)
    assert err.code == "tls" and "not signed by the configured CA" in err.message, err


def test_starttls_works_and_plain_needs_explicit_permission(ldap_raw, slapd):
    ldap_raw.update(servers=[f"localhost:{slapd.port}"], tls="starttls")
    assert authenticate(load_config(ldap_raw), "u005", "pw005")["outcome"] == "success"
    ldap_raw["tls"] = "plain"
    with pytest.raises(DirectoryError, match="allow_plain"):
        load_config(ldap_raw)
    ldap_raw["allow_plain"] = True
    assert authenticate(load_config(ldap_raw), "u005", "pw005")["outcome"] == "success"


def test_unparsable_filter(ldap_raw):
    ldap_raw["user_filter"] = "(&(objectClass=person)"
    with pytest.raises(DirectoryError) as info:
        load_config(ldap_raw)
    assert info.value.code == "bad_filter" and "user_filter" in info.value.message


def test_mapping_names_missing_attribute(ldap_raw):
    ldap_raw["attribute_mapping"] = {"user": {"username": "uid", "email": "mial"}}
    err = error_of(ldap_raw)
    assert err.code == "missing_attribute" and "'mial'" in err.message and "user.email" in err.message


def test_size_limit_exceeded(ldap_raw):
    ldap_raw.update(bind_dn=LIMITED_DN, bind_password=LIMITED_PW)
    err = error_of(ldap_raw)
    assert err.code == "size_limit" and "size limit" in err.hint


def test_primary_stopped_mid_sync_fails_over_with_nothing_missing(slapd_factory, test_ca):
    # Two replicas with the same entries (same entryUUIDs), as a replicated pool would have.
    ids = [str(uuid.uuid5(uuid.NAMESPACE_DNS, f"fo{i}")) for i in range(300)]
    data = "\n".join(user_ldif(f"fo{i:03d}", "pw", entryUUID=ids[i]) for i in range(300))
    primary, secondary = slapd_factory("primary", data), slapd_factory("secondary", data)
    raw = slapd_config(primary, test_ca, page_size=40)
    raw["servers"] = [f"localhost:{primary.tls_port}", f"localhost:{secondary.tls_port}"]
    stream = full_sync(load_config(raw), chunk_size=40)
    got, msgs = [], []
    for msg in stream:
        msgs.append(msg)
        if msg["type"] == "chunk":
            got += [c["id"] for c in msg["changes"]]
            if msg["seq"] == 2:
                primary.stop()
    assert msgs[-1]["type"] == "end" and msgs[-1]["failovers"] == 1
    assert msgs[-1]["server"] == f"localhost:{secondary.tls_port}"
    users = [i for i in got if i in set(ids)]
    assert sorted(users) == sorted(ids) and len(got) == len(set(got))


def test_hung_primary_mid_sync_fails_over(slapd_factory, test_ca):
    """A primary that stops answering (SIGSTOP, sockets stay open) is left after receive_timeout."""
    import os
    import signal
    ids = [str(uuid.uuid5(uuid.NAMESPACE_DNS, f"hung{i}")) for i in range(120)]
    data = "\n".join(user_ldif(f"hung{i:03d}", "pw", entryUUID=ids[i]) for i in range(120))
    primary, secondary = slapd_factory("hp", data), slapd_factory("hs", data)
    raw = slapd_config(primary, test_ca, page_size=30, receive_timeout=2, connect_timeout=2)
    raw["servers"] = [f"localhost:{primary.tls_port}", f"localhost:{secondary.tls_port}"]
    got, end = [], None
    try:
        for msg in full_sync(load_config(raw), chunk_size=30):
            if msg["type"] == "chunk":
                got += [c["id"] for c in msg["changes"]]
                if msg["seq"] == 1:
                    os.kill(primary.proc.pid, signal.SIGSTOP)
            end = msg
    finally:
        os.kill(primary.proc.pid, signal.SIGCONT)
    assert end["type"] == "end" and end["failovers"] == 1
    assert sorted(i for i in got if i in set(ids)) == sorted(ids)


def test_authentication_and_provisioning_use_the_next_server(slapd_factory, test_ca):
    data = user_ldif("pool1", ssha("pool-pw"), entryUUID=str(uuid.uuid5(uuid.NAMESPACE_DNS, "pool1")))
    primary, secondary = slapd_factory("ap", data), slapd_factory("as", data)
    raw = slapd_config(primary, test_ca)
    raw["servers"] = [f"localhost:{primary.tls_port}", f"localhost:{secondary.tls_port}"]
    primary.stop()
    config = load_config(raw)
    out = authenticate(config, "pool1", "pool-pw")
    assert out["outcome"] == "success" and out["server"] == f"localhost:{secondary.tls_port}"
    r = provision(config, {"id": "p1", "op": "update_user", "username": "pool1", "attributes": {"email": "p@x"}})
    assert r["status"] == "done"


def test_authenticator_reconnects_after_a_server_restart(slapd_factory, test_ca):
    from tether.agent.directory.auth import Authenticator
    server = slapd_factory("restart", user_ldif("re1", ssha("re-pw")))
    auth = Authenticator(load_config(slapd_config(server, test_ca)))
    assert auth.authenticate("re1", "re-pw")["outcome"] == "success"
    assert auth.authenticate("re1", "bad")["outcome"] == "wrong_password"  # same connections, rebinding
    server.stop()
    server.start()
    assert auth.authenticate("re1", "re-pw")["outcome"] == "success"
    auth.close()


def test_write_cut_off_midway_reports_outcome_unknown(slapd_factory, test_ca):
    """The server stops answering after the order was sent: failed, and flagged as not safe to retry."""
    import os
    import signal
    from tether.agent.directory.connection import Pool
    server = slapd_factory("cut", user_ldif("cut1", "pw"))
    config = load_config(slapd_config(server, test_ca, receive_timeout=1))

    class FreezeAfterConnect(Pool):
        def connect(self, *args, **kwargs):
            conn = super().connect(*args, **kwargs)
            os.kill(server.proc.pid, signal.SIGSTOP)
            return conn
    try:
        r = provision(config, {"id": "w1", "op": "delete_user", "dn": f"uid=cut1,ou=people,{SUFFIX}"},
                      pool=FreezeAfterConnect(config))
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert r["status"] == "failed" and r["code"] == "server_down" and r["outcome_unknown"] is True


def _receivers() -> list:
    import threading
    return [t for t in threading.enumerate() if type(t).__name__ == "ReceiverSocketThread" and t.is_alive()]


def test_refused_notification_bind_leaves_no_reader_on_a_reused_socket(ldap_raw):
    """Why the wrong password was sometimes reported as `tls` (WRONG_VERSION_NUMBER).

    The notifier's ASYNC_STREAM connection starts ldap3's receiver thread at open,
    before the bind. When the bind was refused, ldap3's unbind closed the socket
    under that thread; the thread then either spun forever (socket None plus a
    receive timeout) or, under load, read once more from the closed descriptor
    after the follower's next connection reused it, eating part of that
    connection's TLS handshake. Every receiver must be gone when the error is raised.
    """
    import ldap3
    from tether.agent.directory.connection import Pool
    before = set(_receivers())
    # a DN that does not exist: refused like a wrong password, without counting failures
    # against the shared service account (ppolicy would lock it for the next tests)
    ldap_raw.update(bind_dn=f"cn=nobody,{SUFFIX}", bind_password="wrong")
    pool = Pool(load_config(ldap_raw))
    for _ in range(5):
        with pytest.raises(DirectoryError) as info:
            pool.connect(strategy=ldap3.ASYNC_STREAM)
        assert info.value.code == "bind_failed", info.value
        assert set(_receivers()) <= before, "a receiver thread outlived its refused connection"
