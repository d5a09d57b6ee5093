"""Issue 12, the flow of the data, end to end with real processes: a group far
larger than a frame arrives in home's store and then takes a one-member change;
a stall (the directory server gone) shows in `directory status` with a reason
and clears when changes flow again. No timing asserts: only generous deadlines.
"""

from __future__ import annotations

import csv
import sys

import ldap3
import pytest

from e2erig import directory_entry, wait_for
from ldapfix_helpers import admin_connection, seed_ldif, slapd_config
from ldapfix_slapd import SUFFIX, group_ldif

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]

GROUPS = f"ou=groups,{SUFFIX}"
BIG = f"cn=everyone,{GROUPS}"
#: Members of the large group (DNs outside the snapshot are kept, so they need not exist).
MEMBERS = [f"uid=m{i:06d},ou=people,{SUFFIX}" for i in range(100_000)]

csv.field_size_limit(sys.maxsize)  # the export's members cell of 100,000 DNs


@pytest.fixture
def rig_factory(tmp_path):
    from e2erig import Rig
    made = []

    def make():
        made.append(Rig.start(tmp_path / f"rig{len(made)}"))
        return made[-1]
    yield make
    for rig in made:
        rig.stop()


def big_group(rig, directory: str = "big") -> list[str]:
    rows = rig.export(directory) or []
    row = next((r for r in rows if r.get("dn", "").lower() == BIG.lower()), None)
    return row["members"].split("|") if row and row.get("members") else []


def test_a_100k_member_group_arrives_takes_a_change_and_a_stall_shows_and_clears(
        slapd_factory, test_ca, rig_factory):
    server = slapd_factory("big", seed_ldif() + "\n" + group_ldif("everyone", MEMBERS))
    conn = admin_connection(server, test_ca)
    rig = rig_factory()
    rig.agent("c-a")
    rig.configure({"directories": [directory_entry("big", slapd_config(server, test_ca,
                                                                        page_size=200))]})
    wait_for(lambda: len(big_group(rig)) == len(MEMBERS), 600, "the 100,000-member group in the store", interval=3)
    assert sorted(m.lower() for m in big_group(rig)) == sorted(m.lower() for m in MEMBERS)
    assert (rig.directory_status("big") or {}).get("stall") is None

    added = f"uid=latecomer,ou=people,{SUFFIX}"
    assert conn.modify(BIG, {"member": [(ldap3.MODIFY_ADD, [added])]}), conn.result
    wait_for(lambda: any(m.lower() == added.lower() for m in big_group(rig)), 300,
             "the one-member change of the large group in the store", interval=2)
    assert len(big_group(rig)) == len(MEMBERS) + 1

    # a stall: the leader's follower cannot reach the directory any more
    conn.unbind()
    server.stop()
    row = wait_for(lambda: (r := rig.directory_status("big")) and r.get("stall") and r, 120,
                   "the stall in directory status", interval=2)
    assert "server_down" in row["stall"]["reason"] and row["stall"]["hint"], row["stall"]
    human = rig.cli("directory", "status")
    assert "stalled: " in human.stdout, human.stdout

    server.start()
    conn = admin_connection(server, test_ca)
    back = f"uid=returning,ou=people,{SUFFIX}"
    assert conn.modify(BIG, {"member": [(ldap3.MODIFY_ADD, [back])]}), conn.result
    wait_for(lambda: any(m.lower() == back.lower() for m in big_group(rig)), 300,
             "changes flowing again after the server returned", interval=2)
    wait_for(lambda: (rig.directory_status("big") or {"stall": 1}).get("stall") is None, 120,
             "the stall cleared")
    conn.unbind()


def test_samba_group_read_in_pages_takes_changes_and_a_stall_shows_and_clears(samba, test_ca, rig_factory):
    """The same flow on a real Samba AD DC: a group larger than AD's range page, read in
    `member;range=` pages (Samba pages only when asked: member_range_size), arrives whole,
    takes one-member changes (sent home as member deltas: above deltas.MIN_MEMBERS), and a
    stall (the DC stopped) shows in `directory status` and clears once it is back.
    2,500 members, not 100,000: Samba adds about 50 users/s, and AD links need real users."""
    from ldapfix_helpers import AD_BASE, ad_admin_connection, ad_config
    n = 2500
    users = f"CN=Users,{AD_BASE}"
    admin = ad_admin_connection(test_ca)
    dns = [f"CN=big12-{i:05d},{users}" for i in range(n + 2)]
    for i, dn in enumerate(dns):
        assert admin.add(dn, ["top", "person", "organizationalPerson", "user"],
                         {"sAMAccountName": f"big12-{i:05d}"}), admin.result
    group = f"CN=big12-all,{users}"
    assert admin.add(group, ["top", "group"], {"sAMAccountName": "big12-all"}), admin.result
    for i in range(0, n, 500):
        assert admin.modify(group, {"member": [(ldap3.MODIFY_ADD, dns[i:i + 500])]}), admin.result

    def members():
        row = next((r for r in rig.export("adbig") or [] if r["dn"].lower() == group.lower()), None)
        return sorted(m.lower() for m in row["members"].split("|")) if row and row["members"] else []
    rig = rig_factory()
    rig.agent("c-a")
    rig.configure({"directories": [directory_entry("adbig", ad_config(
        test_ca, page_size=500, member_range_size=1000))]})
    wait_for(lambda: len(members()) == n, 600, f"the {n}-member AD group in the store", interval=3)
    assert members() == sorted(d.lower() for d in dns[:n])

    assert admin.modify(group, {"member": [(ldap3.MODIFY_ADD, [dns[n]]),
                                           (ldap3.MODIFY_DELETE, [dns[0]])]}), admin.result
    want = sorted(d.lower() for d in dns[1:n + 1])
    wait_for(lambda: members() == want, 300, "the one-member changes of the AD group in the store",
             interval=2)
    assert (rig.directory_status("adbig") or {}).get("stall") is None

    admin.unbind()
    samba.stop()
    try:
        row = wait_for(lambda: (r := rig.directory_status("adbig")) and r.get("stall") and r, 180,
                       "the stall in directory status", interval=2)
        assert "server_down" in row["stall"]["reason"] and row["stall"]["hint"], row["stall"]
    finally:
        samba.start()
    admin = ad_admin_connection(test_ca)
    try:
        assert admin.modify(group, {"member": [(ldap3.MODIFY_ADD, [dns[n + 1]])]}), admin.result
        want = sorted(want + [dns[n + 1].lower()])
        wait_for(lambda: members() == want, 300, "changes flowing again after the DC returned",
                 interval=2)
        wait_for(lambda: (rig.directory_status("adbig") or {"stall": 1}).get("stall") is None, 180,
                 "the stall cleared")
    finally:
        admin.unbind()

