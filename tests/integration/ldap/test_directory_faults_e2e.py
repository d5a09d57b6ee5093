"""Directory faults reach home's `directory status`, end to end (issue 5, "Bad input and faults").

Real ``tether-home serve`` and ``tether-agent run`` processes and a real slapd.
One connector carries four directories on the same server: a wrong bind
password and a TLS name mismatch (the follower spools an ``error`` message,
drained home), a user filter that does not parse (refused at configure time:
the agent answers home's ``sync`` with the error and home records it), and a
good one that must sync to equality meanwhile. No timing asserts: only
generous deadlines.
"""

from __future__ import annotations

import pytest

from e2erig import GROUPS_F, USERS_F, OPENLDAP_MAPPING, Rig, directory_entry, ldap_rows, wait_for
from ldapfix_helpers import slapd_config
from ldapfix_slapd import SUFFIX

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


@pytest.fixture
def rig(tmp_path):
    rig = Rig.start(tmp_path / "rig", connectors=("c-a",))
    yield rig
    rig.stop()


def error_of(rig: Rig, directory: str) -> dict | None:
    row = rig.directory_status(directory)
    return row and row.get("error")


def code_of(rig: Rig, directory: str, code: str) -> dict | None:
    """The directory's error once it has `code` (None before)."""
    error = error_of(rig, directory)
    return error if error and error["code"] == code else None


def test_faulty_directories_show_their_errors_while_a_good_one_syncs(seeded_ldap, test_ca, rig):
    server, conn = seeded_ldap
    raw = slapd_config(server, test_ca, page_size=50)
    rig.agent("c-a")
    rig.configure({"directories": [
        directory_entry("badpw", {**raw, "bind_password": "not-the-password"}),
        # the fixture's certificate names only localhost: its IP is a name mismatch
        directory_entry("tlsname", {**raw, "servers": [f"127.0.0.1:{server.tls_port}"]}),
        directory_entry("badfilter", {**raw, "user_filter": "(uid=broken"}),
        directory_entry("good", raw),
    ]})

    rig.wait_store_equals("good", lambda: ldap_rows(conn, SUFFIX, USERS_F, GROUPS_F,
                                                    OPENLDAP_MAPPING))
    # on a loaded machine a wrong password's handshake has been seen classified `tls`
    # once; the follower retries every minute and the newest error replaces it
    badpw = wait_for(lambda: code_of(rig, "badpw", "bind_failed"), 300,
                     "badpw's bind_failed in directory status")
    assert badpw["code"] == "bind_failed" and "invalid credentials" in badpw["message"], badpw
    assert "bind DN and password" in badpw["hint"] and badpw["instance"] and badpw["at"]
    tls = wait_for(lambda: error_of(rig, "tlsname"), 120, "tlsname's error in directory status")
    assert tls["code"] == "tls" and "does not name '127.0.0.1'" in tls["message"], tls
    refused = wait_for(lambda: error_of(rig, "badfilter"), 120, "badfilter's refusal recorded")
    assert refused["code"] == "bad_filter" and "user_filter" in refused["message"], refused
    assert error_of(rig, "good") is None
    assert rig.directory_status("badpw")["users"] == 0

    text = rig.cli("directory", "status")
    assert text.returncode == 0, text.stderr
    assert f"error: bind_failed: {badpw['message']} ({badpw['hint']})" in text.stdout
    status = rig.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    assert '"code": "tls"' in status.stdout and '"bind_failed"' in status.stdout
