"""Group create/delete orders (and read-back) against real slapd and a real Samba AD DC."""

from __future__ import annotations

import pytest

from ldapfix_helpers import AD_BASE, ad_user
from ldapfix_slapd import SUFFIX
from tether.agent.directory import DirectoryService
from tether.agent.directory.auth import authenticate
from tether.agent.directory.config import load_config
from tether.agent.directory.provision import provision

PEOPLE = f"ou=people,{SUFFIX}"
GROUPS = f"ou=groups,{SUFFIX}"


def test_openldap_group_create_members_delete(ldap_raw, ldap_admin):
    config = load_config({**ldap_raw, "group_container": GROUPS})
    r = provision(config, {"id": "g1", "op": "create_group", "group": "scim-team",
                           "members": [f"uid=u003,{PEOPLE}"], "read_back": True})
    assert r["status"] == "done" and r["dn"] == f"cn=scim-team,{GROUPS}", r
    entry = r["entry"]
    assert entry["kind"] == "group" and entry["attributes"]["name"] == "scim-team"
    assert entry["members"] == [f"uid=u003,{PEOPLE}"] and len(entry["id"]) == 36
    assert "scim-team" in [g["name"] for g in authenticate(config, "u003", "pw003")["groups"]]
    # an empty group is valid too (groupOfNames needs a member: the empty DN stands in)
    r = provision(config, {"id": "g2", "op": "create_group", "group": "scim-empty", "read_back": True})
    assert r["status"] == "done" and r["entry"]["members"] == [""], r
    r = provision(config, {"id": "g3", "op": "create_group", "group": "scim-team"})
    assert r["status"] == "failed" and r["server_code"] == 68  # exists already
    r = provision(config, {"id": "g4", "op": "add_member", "group": "scim-team", "member": "u004",
                           "read_back": True})
    assert r["status"] == "done" and f"uid=u004,{PEOPLE}" in r["entry"]["members"]
    assert provision(config, {"id": "g5", "op": "delete_group", "group": "scim-team"})["status"] == "done"
    assert provision(config, {"id": "g6", "op": "delete_group",
                              "group_dn": f"cn=scim-empty,{GROUPS}"})["status"] == "done"
    assert "scim-team" not in [g["name"] for g in authenticate(config, "u003", "pw003")["groups"]]
    r = provision(config, {"id": "g7", "op": "delete_group", "group": "scim-team"})
    assert r["status"] == "failed" and r["code"] == "bad_order" and "no group" in r["reason"]
    r = provision(config, {"id": "g8", "op": "create_group"})
    assert r["status"] == "failed" and r["code"] == "bad_order"


def test_openldap_user_read_back_and_unmapped_fields(ldap_raw):
    config = load_config(ldap_raw)
    r = provision(config, {"id": "r1", "op": "create_user", "username": "rb1", "password": "Rb-pass-1",
                           "attributes": {"name": "Read Back", "email": "rb1@example.com",
                                          "department": "R&D"},
                           "skip_unmapped": True, "read_back": True})
    assert r["status"] == "done" and r["ignored"] == ["department"], r
    assert r["entry"]["attributes"] == {"username": "rb1", "name": "Read Back", "email": "rb1@example.com"}
    assert "disabled" not in r["entry"]  # no ppolicy lock: enabled
    r = provision(config, {"id": "r2", "op": "disable_user", "username": "rb1", "read_back": True})
    assert r["entry"]["disabled"] is True
    records = [c for m in DirectoryService(ldap_raw).full_sync() if m["type"] == "chunk"
               for c in m["changes"] if c.get("dn") == r["dn"]]
    assert records[0]["disabled"] is True  # the sync carries the lock too
    r = provision(config, {"id": "r3", "op": "update_user", "username": "rb1", "read_back": True,
                           "attributes": {"email": ""}, "skip_unmapped": True})
    assert r["status"] == "done" and r["entry"]["attributes"]["email"] is None, r
    assert provision(config, {"id": "r4", "op": "delete_user", "username": "rb1"})["status"] == "done"


@pytest.mark.slow
def test_ad_group_create_members_delete(ad_raw, ad_admin):
    config = load_config(ad_raw)
    carl = ad_user(ad_admin, "carl", "Carl-Pass-1")
    r = provision(config, {"id": "a1", "op": "create_group", "group": "scim-ops", "members": [carl],
                           "read_back": True})
    assert r["status"] == "done" and r["dn"] == f"CN=scim-ops,CN=Users,{AD_BASE}", r
    assert r["entry"]["attributes"]["name"] == "scim-ops" and r["entry"]["members"] == [carl]
    assert "scim-ops" in [g["name"] for g in authenticate(config, "carl", "Carl-Pass-1")["groups"]]
    r = provision(config, {"id": "a2", "op": "create_group", "group": "scim-none", "read_back": True})
    assert r["status"] == "done" and r["entry"]["members"] == []
    r = provision(config, {"id": "a3", "op": "disable_user", "username": "carl", "read_back": True})
    assert r["entry"]["disabled"] is True
    assert authenticate(config, "carl", "Carl-Pass-1")["outcome"] == "disabled"
    r = provision(config, {"id": "a3b", "op": "enable_user", "username": "carl", "read_back": True})
    assert r["entry"]["disabled"] is False
    assert provision(config, {"id": "a4", "op": "delete_group", "group": "scim-ops"})["status"] == "done"
    assert provision(config, {"id": "a5", "op": "delete_group", "group": "scim-none"})["status"] == "done"
    assert "scim-ops" not in [g["name"] for g in authenticate(config, "carl", "Carl-Pass-1")["groups"]]
    assert provision(config, {"id": "a6", "op": "delete_user", "username": "carl"})["status"] == "done"
