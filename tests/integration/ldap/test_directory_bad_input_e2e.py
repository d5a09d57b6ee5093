"""Issue 12 "Bad input", end to end on real servers and real processes: a member value
that is not a DN (slapd) and a text attribute holding bytes that are not UTF-8 (Samba
AD, whose IA5 strings such as gecos take any bytes: a Latin-1 gecos is a classic) are
each reported in `directory status` with the entry they came from, while the rest of
the directory keeps syncing (a later change still arrives); a member loop on Samba too
(slapd's is in test_directory_meaning_e2e.py). No timing asserts: only generous deadlines.
"""

from __future__ import annotations

import ldap3
import pytest

from e2erig import Rig, directory_entry, wait_for
from ldapfix_helpers import slapd_config
from ldapfix_slapd import SUFFIX

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

PEOPLE = f"ou=people,{SUFFIX}"
GROUPS = f"ou=groups,{SUFFIX}"


@pytest.fixture
def rig(tmp_path):
    rig = Rig.start(tmp_path / "rig", connectors=("c-a",))
    yield rig
    rig.stop()


def problems_of(rig, directory: str) -> list[dict]:
    row = rig.directory_status(directory) or {}
    return (row.get("problems") or {}).get("items") or []


def test_member_values_that_are_not_dns_are_reported_with_their_group(seeded_ldap, test_ca, rig):
    """posixGroup's memberUid holds user names, not DNs: a directory configured to read it
    as its member attribute gets every such value reported on its group, kept as written,
    while a DN value in the same attribute resolves and the directory keeps syncing."""
    server, conn = seeded_ldap
    assert conn.add(f"cn=devs,{GROUPS}", ["posixGroup"], {"cn": "devs", "gidNumber": "5001",
                                                          "memberUid": ["u000", "u001"]}), conn.result
    assert conn.add(f"cn=ops,{GROUPS}", ["posixGroup"], {"cn": "ops", "gidNumber": "5002",
                                                         "memberUid": [f"uid=u002,{PEOPLE}"]}), conn.result
    rig.agent("c-a")
    rig.configure({"directories": [directory_entry("posix", slapd_config(
        server, test_ca, page_size=50, member_attribute="memberUid",
        group_filter="(objectClass=posixGroup)"))]})

    items = wait_for(lambda: problems_of(rig, "posix") or None, 180, "the data problems in directory status")
    assert {(p["dn"], p["code"], p["attribute"]) for p in items} == {
        (f"cn=devs,{GROUPS}", "bad_member_dn", "member")}, items
    assert len(items) == 2 and all("names nothing" in p["message"] for p in items), items
    rows = rig.export("posix")
    devs = next(r for r in rows if r["dn"] == f"cn=devs,{GROUPS}")
    assert sorted(devs["members"].split("|")) == ["u000", "u001"]  # kept as written
    u002 = next(r for r in rows if r["dn"] == f"uid=u002,{PEOPLE}")
    assert u002["member_of"] == f"cn=ops,{GROUPS}"
    text = rig.cli("directory", "status").stdout
    assert "problems:" in text and f"cn=devs,{GROUPS}" in text, text

    # the rest keeps syncing: a later change arrives
    assert conn.modify(f"uid=u003,{PEOPLE}", {"mail": [(ldap3.MODIFY_REPLACE, ["moved@example.com"])]}), \
        conn.result
    wait_for(lambda: any(r.get("email") == "moved@example.com" for r in rig.export("posix") or []), 120,
             "a later change of the same directory in home's store")
    # fixing the group clears its problem
    assert conn.modify(f"cn=devs,{GROUPS}", {"memberUid": [(ldap3.MODIFY_REPLACE, [f"uid=u000,{PEOPLE}"])]}), \
        conn.result
    wait_for(lambda: not problems_of(rig, "posix"), 120, "the problem cleared after the fix")


def test_text_attribute_holding_bytes_is_reported_with_its_user(samba, test_ca, rig):
    """Samba stores bytes that are not UTF-8 in an IA5-string attribute (gecos): the
    value reaches home as base64 (never decoded lossily) and `binary_in_text` names the user,
    while the other users sync and a later change arrives."""
    import base64

    from ldapfix_helpers import AD_BASE, ad_admin_connection, ad_config
    users = f"CN=Users,{AD_BASE}"
    admin = ad_admin_connection(test_ca)
    raw_value = b"caf\xe9 \xff\xfe"  # Latin-1 and junk: not UTF-8
    try:
        bad_dn = f"CN=bin12-bad,{users}"
        assert admin.add(bad_dn, ["top", "person", "organizationalPerson", "user"],
                         {"sAMAccountName": "bin12-bad", "userAccountControl": "514"}), admin.result
        assert admin.modify(bad_dn, {"gecos": [(ldap3.MODIFY_REPLACE, [raw_value])]}), admin.result
        good_dn = f"CN=bin12-good,{users}"
        assert admin.add(good_dn, ["top", "person", "organizationalPerson", "user"],
                         {"sAMAccountName": "bin12-good", "userAccountControl": "514",
                          "gecos": "plain text"}), admin.result
        # a member loop (AD allows circular nesting): reported, both groups still sync
        loop_a, loop_b = f"CN=bin12-loopA,{users}", f"CN=bin12-loopB,{users}"
        assert admin.add(loop_a, ["top", "group"], {"sAMAccountName": "bin12-loopA"}), admin.result
        assert admin.add(loop_b, ["top", "group"], {"sAMAccountName": "bin12-loopB",
                                                    "member": [loop_a]}), admin.result
        assert admin.modify(loop_a, {"member": [(ldap3.MODIFY_ADD, [loop_b])]}), admin.result
        admin.search(bad_dn, "(objectClass=*)", search_scope=ldap3.BASE, attributes=["gecos"])
        assert admin.response[0]["raw_attributes"]["gecos"] == [raw_value]  # stored as sent

        mapping = {"user": {"username": "sAMAccountName", "note": "gecos"},
                   "group": {"name": "sAMAccountName"}}
        rig.agent("c-a")
        rig.configure({"directories": [directory_entry("adbin", ad_config(test_ca,
                                                                          attribute_mapping=mapping))]})
        items = wait_for(lambda: problems_of(rig, "adbin") or None, 300, "the data problem in directory status")
        assert [(p["dn"].lower(), p["code"], p["attribute"]) for p in items] == [
            (bad_dn.lower(), "binary_in_text", "gecos")], items
        rows = rig.export("adbin")
        by_name = {r["username"]: r for r in rows if r["kind"] == "user"}
        loops = (rig.directory_status("adbin") or {}).get("member_loops") or []
        assert [sorted(g["dn"].lower() for g in loop) for loop in loops] == \
            [sorted([loop_a.lower(), loop_b.lower()])], loops
        groups = {r["dn"].lower(): r for r in rows if r["kind"] == "group"}
        assert groups[loop_a.lower()]["members"].lower() == loop_b.lower()
        assert base64.b64decode(by_name["bin12-bad"]["note;base64"]) == raw_value
        assert by_name["bin12-good"]["note;base64"] == base64.b64encode(b"plain text").decode()

        assert admin.modify(good_dn, {"gecos": [(ldap3.MODIFY_REPLACE, ["changed"])]}), admin.result

        def changed():
            row = next((r for r in rig.export("adbin") or [] if r.get("username") == "bin12-good"), None)
            return row and base64.b64decode(row["note;base64"]) == b"changed"
        wait_for(changed, 180, "a later change of the same directory in home's store")
        assert [p["code"] for p in problems_of(rig, "adbin")] == ["binary_in_text"]
    finally:
        admin.unbind()
