"""Issue 12, the meaning of the data, end to end on a real slapd and real processes.

Users whose RDN holds every special character, listed by groups in other
spellings than slapd's own, have exactly their memberships in home's export;
a jpegPhoto arrives byte for byte (base64, ``photo;base64`` column); a member
outside the synced bases is kept and shown in ``directory status``. slapd's
own DN matching is the reference for tether.dn's equality.
"""

from __future__ import annotations

import base64
import os

import ldap3
import pytest
from ldap3.utils.dn import escape_rdn

from e2erig import Rig, directory_entry, wait_for
from ldapfix_helpers import slapd_config
from ldapfix_slapd import SUFFIX
from tether import dn

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

PEOPLE = f"ou=people,{SUFFIX}"
GROUPS = f"ou=groups,{SUFFIX}"
NAMES = ["Smith, John", "a+b", 'say "hi"', "back\\slash", "semi;colon", "eq=ual", "<angle>",
         "#hash", " lead", "trail ", "Ren\u00e9e \u5f20\u4f1f"]
MAPPING = {"user": {"username": "uid", "name": "cn", "email": "mail", "photo": "jpegPhoto"},
           "group": {"name": "cn"}}


def hex_spelling(name: str) -> str:
    """Another spelling of the user's DN: every byte of the value hex-escaped, types upper case."""
    return "CN=" + "".join(f"\\{b:02X}" for b in name.encode()) + "," + PEOPLE.upper()


def unchecked(conn) -> ldap3.Connection:
    """The admin connection without ldap3's client-side DN check (it refuses `cn = x`,
    a spelling slapd accepts), so the server sees every spelling as written."""
    return ldap3.Connection(conn.server, conn.user, conn.password, auto_bind=True,
                            check_names=False)


def seed(conn) -> dict[str, str]:
    """The special users (their DN as written) and two groups listing them in other spellings."""
    dns = {}
    for i, name in enumerate(NAMES):
        entry_dn = f"cn={escape_rdn(name)},{PEOPLE}"
        assert conn.add(entry_dn, ["inetOrgPerson"], {"cn": name, "sn": "x", "uid": f"s{i:02d}",
                                                      "mail": f"s{i:02d}@example.com"}), conn.result
        dns[name] = entry_dn
    assert conn.add(f"cn=special,{GROUPS}", ["groupOfNames"],
                    {"cn": "special", "member": [hex_spelling(n) for n in NAMES]}), conn.result
    odd = NAMES[::2]
    assert conn.add(f"cn=odd,{GROUPS}", ["groupOfNames"], {"cn": "odd", "member": [
        f"cn = {escape_rdn(n).upper()} , OU=People,{SUFFIX}" for n in odd]
        + ["uid=ghost,ou=elsewhere,dc=other"]}), conn.result
    return dns


def test_slapd_matches_what_tether_dn_matches(seeded_ldap):
    """slapd as the reference: every spelling it resolves to the entry, tether.dn calls the same."""
    server, conn = seeded_ldap
    conn = unchecked(conn)
    dns = seed(conn)
    for name, entry_dn in dns.items():
        conn.search(entry_dn, "(objectClass=*)", search_scope=ldap3.BASE, attributes=["1.1"])
        slapd_dn = conn.response[0]["dn"]  # slapd's own spelling of it
        for spelling in (hex_spelling(name), entry_dn, slapd_dn,
                         f"cn = {escape_rdn(name).upper()} , OU=People,{SUFFIX}"):
            assert conn.search(spelling, "(objectClass=*)", search_scope=ldap3.BASE,
                               attributes=["1.1"]), (spelling, conn.result)
            assert dn.same(spelling, slapd_dn), (spelling, slapd_dn)
            conn.search(GROUPS, f"(member={ldap3.utils.conv.escape_filter_chars(spelling)})",
                        attributes=["1.1"])
            slapd_groups = {dn.key(e["dn"]) for e in conn.response}
            assert dn.key(f"cn=special,{GROUPS}") in slapd_groups
    # and different names stay different for both
    assert not conn.search(f"cn=Smith John,{PEOPLE}", "(objectClass=*)", search_scope=ldap3.BASE)
    assert not dn.same(f"cn=Smith John,{PEOPLE}", dns["Smith, John"])


def test_special_users_have_exactly_their_memberships_and_photo_round_trips(
        seeded_ldap, test_ca, tmp_path):
    server, conn = seeded_ldap
    conn = unchecked(conn)
    dns = seed(conn)
    photo = bytes.fromhex("ffd8ffe000104a464946") + os.urandom(3000) + b"\xff\xd9"
    assert conn.modify(dns["Smith, John"], {"jpegPhoto": [(ldap3.MODIFY_REPLACE, [photo])]}), conn.result
    # a member loop (A in B in A): reported, both groups still sync
    assert conn.add(f"cn=loopA,{GROUPS}", ["groupOfNames"], {"cn": "loopA", "member": [
        f"CN=LOOPB,{GROUPS}"]}), conn.result
    assert conn.add(f"cn=loopB,{GROUPS}", ["groupOfNames"], {"cn": "loopB", "member": [
        f"cn=loopa,{GROUPS}"]}), conn.result
    rig = Rig.start(tmp_path / "rig", connectors=("c-a",))
    try:
        rig.agent("c-a")
        rig.configure({"directories": [directory_entry("corp", slapd_config(
            server, test_ca, page_size=50, attribute_mapping=MAPPING))]})

        def ready():
            rows = rig.export("corp")
            return rows if rows and any(r["dn"] == f"cn=odd,{GROUPS}" for r in rows) else None
        rows = wait_for(ready, 180, "the special users and groups in home's export")
        by_name = {r["name"]: r for r in rows if r["kind"] == "user"}
        for i, name in enumerate(NAMES):
            row = by_name[name]
            want = {f"cn=special,{GROUPS}"} | ({f"cn=odd,{GROUPS}"} if name in NAMES[::2] else set())
            got = set(row["member_of"].split("|")) if row["member_of"] else set()
            assert {dn.key(g) for g in got} == {dn.key(g) for g in want}, (name, row)
            assert row["username"] == f"s{i:02d}"
        assert "photo;base64" in rows[0]
        assert base64.b64decode(by_name["Smith, John"]["photo;base64"]) == photo
        status = rig.directory_status("corp")
        assert status["unresolved_members"]["count"] == 1
        assert status["unresolved_members"]["examples"][0]["member"] == "uid=ghost,ou=elsewhere,dc=other"
        [loop] = status["member_loops"]
        assert {dn.key(g["dn"]) for g in loop} == {dn.key(f"cn=loopA,{GROUPS}"),
                                                   dn.key(f"cn=loopB,{GROUPS}")}
        text = rig.cli("directory", "status").stdout
        assert "unresolved members: 1" in text and "uid=ghost,ou=elsewhere,dc=other" in text
        assert "member loop: cn=loopA" in text

        # an incremental change: a new member written in yet another spelling
        assert conn.modify(f"cn=odd,{GROUPS}", {"member": [(ldap3.MODIFY_ADD, [
            hex_spelling("a+b").lower()])]}), conn.result

        def added():
            rows = rig.export("corp") or []
            row = next((r for r in rows if r.get("name") == "a+b"), None)
            return row if row and f"cn=odd,{GROUPS}" in row["member_of"] else None
        wait_for(added, 120, "the new membership of 'a+b' in home's export")
    finally:
        rig.stop()


AD_NAMES = ["Smith, John", "a+b", "semi;colon", "#hash", "Ren\u00e9e \u5f20\u4f1f"]


def test_samba_ad_guid_sid_photo_and_special_names(samba, test_ca, tmp_path):
    """Real Samba AD: objectGUID as its UUID, objectSid as S-1-5-..., jpegPhoto byte for byte,
    users whose CN holds special characters have exactly their memberships."""
    import uuid

    from ldapfix_helpers import AD_BASE, ad_admin_connection, ad_config
    from tether.agent.directory.values import sid_text
    users = f"CN=Users,{AD_BASE}"
    admin = ad_admin_connection(test_ca)
    photo = bytes.fromhex("ffd8ffe000104a464946") + os.urandom(2000) + b"\xff\xd9"
    rig = None
    try:
        made = {}
        for i, name in enumerate(AD_NAMES):
            entry_dn = f"CN={escape_rdn(name)},{users}"
            assert admin.add(entry_dn, ["top", "person", "organizationalPerson", "user"],
                             {"sAMAccountName": f"m12-{i}", "displayName": name,
                              "userAccountControl": "514"}), admin.result
            made[name] = entry_dn
        assert admin.modify(made["Smith, John"], {"jpegPhoto": [(ldap3.MODIFY_REPLACE, [photo])]}), \
            admin.result
        group_dn = f"CN=m12-special,{users}"
        assert admin.add(group_dn, ["top", "group"], {"sAMAccountName": "m12-special",
                                                      "member": list(made.values())}), admin.result
        admin.search(users, "(sAMAccountName=m12-0)", attributes=["objectGUID", "objectSid"])
        raw = admin.response[0]["raw_attributes"]
        guid, sid = str(uuid.UUID(bytes_le=raw["objectGUID"][0])), sid_text(raw["objectSid"][0])
        assert sid.startswith("S-1-5-21-")

        mapping = {"user": {"username": "sAMAccountName", "name": "displayName", "photo": "jpegPhoto",
                            "guid": "objectGUID", "sid": "objectSid"},
                   "group": {"name": "sAMAccountName"}}
        rig = Rig.start(tmp_path / "rig", connectors=("c-a",))
        rig.agent("c-a")
        rig.configure({"directories": [directory_entry("ad", ad_config(test_ca,
                                                                       attribute_mapping=mapping))]})

        def ready():
            rows = rig.export("ad")
            return rows if rows and any(r["dn"] == group_dn for r in rows) else None
        rows = wait_for(ready, 300, "the AD users and group in home's export")
        by_user = {r["username"]: r for r in rows if r["kind"] == "user"}
        smith = by_user["m12-0"]
        assert smith["id"] == guid and smith["guid"] == guid and smith["sid"] == sid
        assert base64.b64decode(smith["photo;base64"]) == photo
        for i, name in enumerate(AD_NAMES):
            row = by_user[f"m12-{i}"]
            assert row["name"] == name
            assert dn.same(row["member_of"], group_dn), (name, row["member_of"])
        group = next(r for r in rows if r["dn"] == group_dn)
        assert len(group["members"].split("|")) == len(AD_NAMES)
    finally:
        if rig is not None:
            rig.stop()
        admin.unbind()
