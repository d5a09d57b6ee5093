"""Authentication by binding as the user against a real slapd with ppolicy."""

from __future__ import annotations

import ldap3

from ldapfix_helpers import slapd_config
from ldapfix_slapd import SUFFIX
from tether.agent.directory.auth import authenticate, ppolicy_error
from tether.agent.directory.config import load_config

PEOPLE = f"ou=people,{SUFFIX}"


def test_success_returns_dn_and_nested_groups(ldap_raw):
    out = authenticate(load_config(ldap_raw), "u001", "pw001")
    assert out["outcome"] == "success" and out["dn"] == f"uid=u001,{PEOPLE}"
    names = [g["name"] for g in out["groups"]]
    assert sorted(names) == ["admins", "nested", "outer", "staff"]


def test_wrong_password_unknown_user_and_empty_password(ldap_raw):
    config = load_config(ldap_raw)
    assert authenticate(config, "u002", "nope")["outcome"] == "wrong_password"
    assert authenticate(config, "nobody-here", "x")["outcome"] == "unknown_user"
    assert authenticate(config, "u002", "")["outcome"] == "wrong_password"
    assert authenticate(config, "u*", "pw002")["outcome"] == "unknown_user"  # no filter injection


# Tests that lock, disable or regroup users do it on a slapd of their own
# (seeded_ldap): the session slapd's seed users are shared by every module.
def test_locked_after_too_many_failures(seeded_ldap, test_ca):
    config = load_config(slapd_config(seeded_ldap[0], test_ca))
    for _ in range(5):
        assert authenticate(config, "u015", "bad")["outcome"] == "wrong_password"
    assert authenticate(config, "u015", "pw015")["outcome"] == "locked"


def test_administratively_disabled(seeded_ldap, test_ca):
    server, admin = seeded_ldap
    assert admin.modify(f"uid=u016,{PEOPLE}",
                        {"pwdAccountLockedTime": [(ldap3.MODIFY_REPLACE, ["000001010000Z"])]}), admin.result
    assert authenticate(load_config(slapd_config(server, test_ca)), "u016", "pw016")["outcome"] == "disabled"


def test_expired_password(ldap_raw):
    assert authenticate(load_config(ldap_raw), "expired1", "pw-expired")["outcome"] == "expired"


def test_ppolicy_decoder():
    assert ppolicy_error(bytes.fromhex("3003810101")) == 1
    assert ppolicy_error(bytes.fromhex("3008a0058003010203")) is None
    assert ppolicy_error(b"") is None


def test_cyclic_nested_groups_terminate(seeded_ldap, test_ca):
    server, ldap_admin = seeded_ldap
    ldap_raw = slapd_config(server, test_ca)
    groups = f"ou=groups,{SUFFIX}"
    assert ldap_admin.add(f"cn=cyc-a,{groups}", ["groupOfNames"], {"cn": "cyc-a", "member": [f"uid=u006,{PEOPLE}"]})
    assert ldap_admin.add(f"cn=cyc-b,{groups}", ["groupOfNames"], {"cn": "cyc-b", "member": [f"cn=cyc-a,{groups}"]})
    assert ldap_admin.modify(f"cn=cyc-a,{groups}", {"member": [(ldap3.MODIFY_ADD, [f"cn=cyc-b,{groups}"])]})
    out = authenticate(load_config(ldap_raw), "u006", "pw006")
    assert sorted(g["name"] for g in out["groups"]) == ["cyc-a", "cyc-b", "staff"]
