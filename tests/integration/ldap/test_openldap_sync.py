"""Full and incremental sync against a real slapd."""

from __future__ import annotations

import time

import ldap3

from ldapfix_helpers import admin_connection, seed_ldif, slapd_config
from ldapfix_slapd import ADMIN_PW, SUFFIX, SVC_DN, SVC_PW
from tether.agent.directory.config import load_config
from tether.agent.directory.sync import full_sync, sync

PEOPLE = f"ou=people,{SUFFIX}"


def collect(stream):
    msgs = list(stream)
    changes = [c for m in msgs if m["type"] == "chunk" for c in m["changes"]]
    return msgs, changes


def test_full_sync_streams_users_then_groups_in_ordered_chunks(ldap_raw):
    msgs, changes = collect(full_sync(load_config(ldap_raw), chunk_size=6))
    assert msgs[0]["type"] == "begin" and msgs[0]["mode"] == "full"
    assert msgs[-1]["type"] == "end" and msgs[-1]["cursor"].startswith("tc1:")
    seqs = [m["seq"] for m in msgs[1:]]
    assert seqs == list(range(1, len(seqs) + 1))
    assert all(len(m["changes"]) <= 6 for m in msgs if m["type"] == "chunk")
    kinds = [c["kind"] for c in changes]
    assert kinds == sorted(kinds, key=lambda k: k != "user")  # users first
    users = {c["attributes"]["username"]: c for c in changes if c["kind"] == "user"}
    assert {f"u{i:03d}" for i in range(20)} <= set(users)
    assert users["u003"]["attributes"]["email"] == "u003@example.com"
    assert users["u003"]["dn"] == f"uid=u003,{PEOPLE}"
    assert "password_hashes" not in users["u003"]
    groups = {c["attributes"]["name"]: c for c in changes if c["kind"] == "group"}
    assert set(groups["admins"]["members"]) == {f"uid=u000,{PEOPLE}", f"uid=u001,{PEOPLE}"}
    assert groups["nested"]["members"] == [f"cn=admins,ou=groups,{SUFFIX}"]
    assert len({c["id"] for c in changes}) == len(changes) == msgs[-1]["count"]


def test_hashed_password_sync_is_opt_in(ldap_raw):
    ldap_raw["sync_password_hashes"] = True
    _, changes = collect(full_sync(load_config(ldap_raw)))
    user = next(c for c in changes if c.get("attributes", {}).get("username") == "u004")
    assert len(user["password_hashes"]) == 1 and user["password_hashes"][0].startswith("{SSHA}")


def test_incremental_sees_adds_modifies_renames_moves_and_deletes(seeded_ldap, test_ca):
    """On a slapd of its own: it renames, moves and deletes seed users that other tests
    of the session (test_bridge) expect where the seed put them."""
    server, a = seeded_ldap
    config = load_config(slapd_config(server, test_ca))
    msgs, before = collect(full_sync(config))
    cursor = msgs[-1]["cursor"]
    ids = {c["dn"]: c["id"] for c in before}
    assert a.add(f"uid=inc-new,{PEOPLE}", ["inetOrgPerson"],
                 {"uid": "inc-new", "cn": "n", "sn": "n", "mail": "new@example.com"})
    assert a.modify(f"uid=u010,{PEOPLE}", {"mail": [("MODIFY_REPLACE", ["changed@example.com"])]})
    assert a.modify_dn(f"uid=u011,{PEOPLE}", "uid=u011-renamed")
    assert a.add(f"ou=moved,{SUFFIX}", ["organizationalUnit"], {"ou": "moved"})
    assert a.modify_dn(f"uid=u012,{PEOPLE}", "uid=u012", new_superior=f"ou=moved,{SUFFIX}")
    assert a.delete(f"uid=u013,{PEOPLE}")
    assert a.modify(f"cn=admins,ou=groups,{SUFFIX}", {"member": [("MODIFY_ADD", [f"uid=u014,{PEOPLE}"])]})

    msgs, changes = collect(sync(config, cursor))
    assert msgs[0]["mode"] == "incremental"
    by_id = {c["id"]: c for c in changes}
    new = next(c for c in changes if c["op"] == "upsert" and c["dn"] == f"uid=inc-new,{PEOPLE}")
    assert new["attributes"]["email"] == "new@example.com"
    assert by_id[ids[f"uid=u010,{PEOPLE}"]]["attributes"]["email"] == "changed@example.com"
    renamed = by_id[ids[f"uid=u011,{PEOPLE}"]]
    assert renamed["op"] == "upsert" and renamed["dn"] == f"uid=u011-renamed,{PEOPLE}"
    assert renamed["old_dn"] == f"uid=u011,{PEOPLE}"
    assert by_id[ids[f"uid=u012,{PEOPLE}"]]["dn"] == f"uid=u012,ou=moved,{SUFFIX}"
    assert by_id[ids[f"uid=u013,{PEOPLE}"]] == {"op": "delete", "id": ids[f"uid=u013,{PEOPLE}"],
                                                 "dn": f"uid=u013,{PEOPLE}"}
    assert f"uid=u014,{PEOPLE}" in by_id[ids[f"cn=admins,ou=groups,{SUFFIX}"]]["members"]

    # resuming from the new cursor: nothing new, then exactly the next change
    msgs2, changes2 = collect(sync(config, msgs[-1]["cursor"]))
    assert msgs2[0]["mode"] == "incremental" and changes2 == []
    assert a.delete(f"uid=inc-new,{PEOPLE}")
    msgs3, changes3 = collect(sync(config, msgs2[-1]["cursor"]))
    assert [c["op"] for c in changes3] == ["delete"] and changes3[0]["id"] == new["id"]


def test_purged_accesslog_forces_full_resync(slapd_factory, test_ca):
    server = slapd_factory("purge", seed_ldif(5))
    config = load_config(slapd_config(server, test_ca))
    admin = admin_connection(server, test_ca)
    assert admin.modify(f"uid=u001,{PEOPLE}", {"mail": [("MODIFY_REPLACE", ["a@b"])]})
    cursor = list(full_sync(config))[-1]["cursor"]
    # make slapd purge its log (entries older than 1 s, checked every second): a real purge
    cfg = ldap3.Connection(admin.server, "cn=config", ADMIN_PW, auto_bind=True)
    svc = ldap3.Connection(admin.server, SVC_DN, SVC_PW, auto_bind=True)
    assert cfg.modify("olcOverlay={1}accesslog,olcDatabase={2}mdb,cn=config",
                      {"olcAccessLogPurge": [("MODIFY_REPLACE", ["00+00:00:01 00+00:00:01"])]}), cfg.result
    for _ in range(100):
        time.sleep(0.1)
        admin.modify(f"uid=u002,{PEOPLE}", {"mail": [("MODIFY_REPLACE", [f"x{_}@b"])]})
        svc.search("cn=accesslog", "(objectClass=auditModify)", attributes=["reqDN"])
        assert svc.response, "the service account must see the accesslog"
        if not any(e["attributes"]["reqDN"] == f"uid=u001,{PEOPLE}" for e in svc.response):
            break
    msgs, changes = collect(sync(config, cursor))
    assert msgs[0]["mode"] == "full" and "cursor expired" in msgs[0]["reason"]
    users = {c["attributes"]["username"] for c in changes if c["kind"] == "user"}
    assert users == {"u000", "u001", "u002", "u003", "u004", "expired1"}


def test_garbage_cursor_means_full_resync(ldap_raw):
    msgs, _ = collect(sync(load_config(ldap_raw), "not-a-cursor"))
    assert msgs[0]["mode"] == "full"


def test_password_change_syncs_the_new_hash_when_configured(ldap_raw):
    from tether.agent.directory.provision import provision
    ldap_raw["sync_password_hashes"] = True
    config = load_config(ldap_raw)
    msgs, before = collect(full_sync(config))
    old = next(c for c in before if c.get("attributes", {}).get("username") == "u018")["password_hashes"]
    assert provision(config, {"id": "h1", "op": "set_password", "username": "u018",
                              "password": "brand-new"})["status"] == "done"
    _, changes = collect(sync(config, msgs[-1]["cursor"]))
    new = next(c for c in changes if c.get("attributes", {}).get("username") == "u018")["password_hashes"]
    assert new != old and new[0].startswith("{SSHA}")
