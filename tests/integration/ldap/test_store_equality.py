"""Home away during changes: once it applies the spool, its store equals the directory.

"Home" here is the smallest faithful consumer of the stream: a full sync
replaces the snapshot at `end`, upserts replace by id, deletes remove by id.
The agent side is the real thing: DirectoryService -> Spool, restarted midway.
"""

from __future__ import annotations

import ldap3
import pytest

from ldapfix_helpers import AD_BASE, ad_group, ad_user
from ldapfix_slapd import SUFFIX
from tether.agent.directory import DirectoryService, Spool

PEOPLE = f"ou=people,{SUFFIX}"


class Home:
    def __init__(self):
        self.store: dict[str, dict] = {}
        self._snapshot: dict[str, dict] | None = None

    def apply(self, msg: dict) -> None:
        if msg["type"] == "begin" and msg["mode"] == "full":
            self._snapshot = {}
        target = self._snapshot if self._snapshot is not None else self.store
        if msg["type"] == "chunk":
            for c in msg["changes"]:
                if c["op"] == "upsert":
                    target[c["id"]] = {k: v for k, v in c.items() if k not in ("op", "old_dn")}
                else:
                    target.pop(c["id"], None)
        if msg["type"] == "end" and self._snapshot is not None:
            self.store, self._snapshot = self._snapshot, None

    def drain(self, spool: Spool) -> None:
        for seq, msg in spool.pending():
            self.apply(msg)
            spool.ack(seq)


def agent_sync(raw: dict, spool: Spool, cursor: str | None) -> str:
    svc = DirectoryService(raw)
    for msg in svc.sync(cursor, chunk_size=4):
        spool.append(msg)
        if msg["type"] == "end":
            cursor = msg["cursor"]
    svc.close()
    return cursor


def directory_now(raw: dict) -> dict[str, dict]:
    home = Home()
    for msg in DirectoryService(raw).full_sync():
        home.apply(msg)
    return home.store


def assert_equal(home: Home, raw: dict) -> None:
    expected = directory_now(raw)
    assert set(home.store) == set(expected)
    for entry_id, record in expected.items():
        assert home.store[entry_id] == record, entry_id


def run_scenario(raw, tmp_path, mutate_rounds):
    """Home away for all rounds (spool grows, agent restarts), then compare; then home present each round."""
    spool_dir = tmp_path / "spool"
    home = Home()
    cursor = agent_sync(raw, Spool(spool_dir), None)
    home.drain(Spool(spool_dir))
    for mutate, _ in mutate_rounds:  # home is away: nothing is acknowledged, the agent restarts each round
        mutate()
        cursor = agent_sync(raw, Spool(spool_dir), cursor)
    assert len(Spool(spool_dir)) > 2
    home.drain(Spool(spool_dir))
    assert_equal(home, raw)
    for _, mutate in mutate_rounds:  # home present: equal after every single round
        mutate()
        cursor = agent_sync(raw, Spool(spool_dir), cursor)
        home.drain(Spool(spool_dir))
        assert_equal(home, raw)


def test_openldap_store_equals_directory(ldap_raw, ldap_admin, tmp_path):
    a = ldap_admin

    def rounds(x: str, victim: str):
        def round1():
            assert a.add(f"uid=eq{x},{PEOPLE}", ["inetOrgPerson"], {"uid": f"eq{x}", "cn": "e", "sn": "e"})
            assert a.modify(f"uid=u008,{PEOPLE}", {"mail": [(ldap3.MODIFY_REPLACE, [f"eq{x}@example.com"])]})
            assert a.modify(f"cn=staff,ou=groups,{SUFFIX}", {"member": [(ldap3.MODIFY_ADD, [f"uid=eq{x},{PEOPLE}"])]})

        def round2():
            assert a.modify_dn(f"uid=eq{x},{PEOPLE}", f"uid=eq{x}-renamed")
            assert a.delete(f"uid={victim},{PEOPLE}")
            assert a.add(f"cn=eqgroup{x},ou=groups,{SUFFIX}", ["groupOfNames"],
                         {"cn": f"eqgroup{x}", "member": [f"uid=u008,{PEOPLE}"]})

        def round3():
            assert a.delete(f"cn=eqgroup{x},ou=groups,{SUFFIX}")
            assert a.modify(f"uid=u008,{PEOPLE}", {"mail": [(ldap3.MODIFY_DELETE, [])]})
        return [round1, round2, round3]

    # The victims exist before the first sync, like the seed users, but are the test's
    # own: the seed users on the session's slapd are other tests' (u009, u017 log in).
    for victim in ("eqvictim1", "eqvictim2"):
        assert a.add(f"uid={victim},{PEOPLE}", ["inetOrgPerson"], {"uid": victim, "cn": "v", "sn": "v"})
    run_scenario(ldap_raw, tmp_path, list(zip(rounds("1", "eqvictim1"), rounds("2", "eqvictim2"))))


@pytest.mark.slow
def test_ad_store_equals_directory(ad_raw, ad_admin, tmp_path):
    run_scenario(ad_raw, tmp_path, list(zip(ad_rounds(ad_admin, "a"), ad_rounds(ad_admin, "b"))))


def ad_rounds(a, x: str):
    users = f"CN=Users,{AD_BASE}"

    def round1():
        ad_user(a, f"eq{x}1")
        ad_user(a, f"eq{x}2")
        ad_group(a, f"eqg{x}", [f"CN=eq{x}1,{users}"])

    def round2():  # renaming a member changes the DN its group lists, not the group's USN
        assert a.modify_dn(f"CN=eq{x}1,{users}", f"CN=eq{x}1-renamed")

    def round3():
        assert a.delete(f"CN=eq{x}2,{users}")
        assert a.modify(f"CN=eqg{x},{users}",
                        {"member": [(ldap3.MODIFY_DELETE, [f"CN=eq{x}1-renamed,{users}"])]}), a.result

    def round4():
        ad_user(a, f"eq{x}3")
        assert a.modify(f"CN=eqg{x},{users}", {"member": [(ldap3.MODIFY_ADD, [f"CN=eq{x}3,{users}"])]}), a.result

    def round5():  # deleting a member changes the group's member list implicitly (link removal)
        assert a.delete(f"CN=eq{x}3,{users}"), a.result

    return [round1, round2, round3, round4, round5]
