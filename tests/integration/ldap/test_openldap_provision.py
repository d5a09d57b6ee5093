"""Provisioning orders against a real slapd: each returns done / failed with the server's reason."""

from __future__ import annotations

from ldapfix_slapd import SUFFIX
from tether.agent.directory.auth import authenticate
from tether.agent.directory.config import load_config
from tether.agent.directory.provision import provision

PEOPLE = f"ou=people,{SUFFIX}"


def test_user_lifecycle(ldap_raw, ldap_admin):
    config = load_config(ldap_raw)
    r = provision(config, {"id": "o1", "op": "create_user", "username": "prov1",
                           "attributes": {"email": "prov1@example.com", "name": "Prov One"},
                           "password": "Initial-1"})
    assert r == {"id": "o1", "op": "create_user", "status": "done", "dn": f"uid=prov1,{PEOPLE}"}
    assert authenticate(config, "prov1", "Initial-1")["outcome"] == "success"
    ldap_admin.search(r["dn"], "(objectClass=*)", attributes=["userPassword", "mail"])
    assert ldap_admin.entries[0].userPassword.value.startswith(b"{SSHA}")  # hashed by the server

    r = provision(config, {"id": "o2", "op": "update_user", "username": "prov1",
                           "attributes": {"email": "p1@example.com"}})
    assert r["status"] == "done"
    r = provision(config, {"id": "o3", "op": "set_password", "username": "prov1", "password": "Second-2"})
    assert r["status"] == "done"
    assert authenticate(config, "prov1", "Initial-1")["outcome"] == "wrong_password"
    assert authenticate(config, "prov1", "Second-2")["outcome"] == "success"

    assert provision(config, {"id": "o4", "op": "disable_user", "username": "prov1"})["status"] == "done"
    assert authenticate(config, "prov1", "Second-2")["outcome"] == "disabled"
    assert provision(config, {"id": "o5", "op": "enable_user", "username": "prov1"})["status"] == "done"
    assert authenticate(config, "prov1", "Second-2")["outcome"] == "success"

    r = provision(config, {"id": "o6", "op": "rename_user", "dn": f"uid=prov1,{PEOPLE}", "new_name": "prov1b"})
    assert r["status"] == "done" and r["dn"] == f"uid=prov1b,{PEOPLE}"
    ldap_admin.add(f"ou=elsewhere,{SUFFIX}", ["organizationalUnit"], {"ou": "elsewhere"})
    r = provision(config, {"id": "o7", "op": "move_user", "username": "prov1b",
                           "new_container": f"ou=elsewhere,{SUFFIX}"})
    assert r["status"] == "done" and r["dn"] == f"uid=prov1b,ou=elsewhere,{SUFFIX}"

    r = provision(config, {"id": "o8", "op": "add_member", "group": "admins", "member": "prov1b"})
    assert r["status"] == "done" and "note" not in r
    r = provision(config, {"id": "o9", "op": "add_member", "group": "admins", "member": "prov1b"})
    assert r["status"] == "done" and r["note"] == "already a member"
    assert "admins" in [g["name"] for g in authenticate(config, "prov1b", "Second-2")["groups"]]
    r = provision(config, {"id": "o10", "op": "remove_member", "group": "admins", "member": "prov1b"})
    assert r["status"] == "done"
    assert "admins" not in [g["name"] for g in authenticate(config, "prov1b", "Second-2")["groups"]]

    assert provision(config, {"id": "o11", "op": "delete_user", "username": "prov1b"})["status"] == "done"
    assert authenticate(config, "prov1b", "Second-2")["outcome"] == "unknown_user"


def test_failures_carry_the_servers_reason(ldap_raw):
    config = load_config(ldap_raw)
    r = provision(config, {"id": "f1", "op": "create_user", "username": "u000"})
    assert r["status"] == "failed" and r["server_code"] == 68 and "entryAlreadyExists" in r["reason"]
    r = provision(config, {"id": "f2", "op": "update_user", "username": "u000",
                           "attributes": {"nosuch": "x"}})
    assert r["status"] == "failed" and r["code"] == "bad_order" and "nosuch" in r["reason"]
    r = provision(config, {"id": "f3", "op": "delete_user", "dn": f"uid=ghost,{PEOPLE}"})
    assert r["status"] == "failed" and r["server_code"] == 32
    r = provision(config, {"id": "f4", "op": "frobnicate"})
    assert r["status"] == "failed" and "unknown provisioning op" in r["reason"]
    ldap_raw["attribute_mapping"] = {"user": {"username": "uid", "shoe": "shoeSize"}}
    r = provision(load_config(ldap_raw), {"id": "f5", "op": "update_user", "username": "u000",
                                          "attributes": {"shoe": "42"}})
    assert r["status"] == "failed" and r["server_code"] == 17  # undefinedAttributeType, said by slapd
