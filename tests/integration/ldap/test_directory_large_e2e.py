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
