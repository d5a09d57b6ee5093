"""Membership in home's store: a relation between ids, matched by DN meaning (issue 12)."""

from __future__ import annotations

import base64
import csv
import json
import sqlite3

import pytest

from tether.home.directorystore import DirectoryStore


@pytest.fixture
def store(tmp_path):
    s = DirectoryStore(tmp_path / "identity.db")
    yield s
    s.close()


def user(rid, dn, **extra):
    return {"op": "upsert", "kind": "user", "id": rid, "dn": dn,
            "attributes": {"username": rid}, **extra}


def group(rid, dn, members, **extra):
    return {"op": "upsert", "kind": "group", "id": rid, "dn": dn,
            "attributes": {"name": rid}, "members": members, **extra}


def full(store, records, seq=1):
    msgs = [{"type": "begin", "mode": "full", "directory": "d"},
            {"type": "chunk", "seq": 1, "changes": records},
            {"type": "end", "mode": "full", "cursor": "c", "count": len(records)}]
    return store.apply_batch("d", "i1", [{"seq": seq + i, "message": m} for i, m in enumerate(msgs)])


def incremental(store, records, seq):
    return store.apply_batch("d", "i1", [{"seq": seq, "message": {"type": "chunk", "seq": 1,
                                                                    "changes": records}}])


# slapd's own spelling of the entry DN vs the spelling the member value was written with
SMITH_ENTRY = "cn=Smith\\2C John,ou=People,dc=example,dc=org"
SMITH_MEMBER = "CN=smith\\, john , ou=people,DC=Example,DC=org"
MULTI_ENTRY = "cn=Ann+uid=ann,ou=People,dc=example,dc=org"
MULTI_MEMBER = "UID=ANN+CN=ann,ou=people,dc=example,dc=org"
UTF8_ENTRY = "cn=Ren\u00e9e,ou=People,dc=example,dc=org"
UTF8_MEMBER = "cn=Ren\\C3\\A9e,ou=People,dc=example,dc=org"


def test_members_match_by_meaning_and_resolve_to_ids(store, tmp_path):
    full(store, [user("u1", SMITH_ENTRY), user("u2", MULTI_ENTRY), user("u3", UTF8_ENTRY),
                 group("g1", "cn=staff,ou=Groups,dc=example,dc=org",
                       [SMITH_MEMBER, MULTI_MEMBER, UTF8_MEMBER, "uid=ghost,ou=elsewhere,dc=other"])])
    members = store.members_of("d", "g1")
    assert sorted((m["id"] or "-") for m in members) == ["-", "u1", "u2", "u3"]
    assert {m["dn"] for m in members} >= {SMITH_MEMBER, MULTI_MEMBER}  # DN kept as written
    for uid in ("u1", "u2", "u3"):
        assert store.groups_of("d", uid) == [{"id": "g1", "dn": "cn=staff,ou=Groups,dc=example,dc=org"}]
    unresolved = store.unresolved_members("d")
    assert unresolved["count"] == 1 and unresolved["examples"][0]["member"] == "uid=ghost,ou=elsewhere,dc=other"
    out = tmp_path / "x.csv"
    store.export_csv("d", out)
    rows = {r["id"]: r for r in csv.DictReader(out.open())}
    assert rows["u1"]["member_of"] == rows["u2"]["member_of"] == "cn=staff,ou=Groups,dc=example,dc=org"
    assert "uid=ghost,ou=elsewhere,dc=other" in rows["g1"]["members"]  # kept, not dropped


def test_group_before_member_rename_and_delete_resolve(store):
    full(store, [group("g1", "cn=g,dc=x", ["uid=later,dc=x"])])
    assert store.members_of("d", "g1")[0]["id"] is None
    incremental(store, [user("u9", "UID=Later,DC=X")], 4)
    assert store.members_of("d", "g1")[0]["id"] == "u9"
    incremental(store, [user("u9", "uid=renamed,dc=x")], 5)  # the group still lists the old DN
    assert store.members_of("d", "g1")[0]["id"] is None and store.groups_of("d", "u9") == []
    incremental(store, [group("g1", "cn=g,dc=x", ["uid=renamed,dc=x"])], 6)
    assert store.groups_of("d", "u9") == [{"id": "g1", "dn": "cn=g,dc=x"}]
    incremental(store, [{"op": "delete", "id": "g1", "dn": "cn=g,dc=x"}], 7)
    assert store.groups_of("d", "u9") == [] and store.members_of("d", "g1") == []


def test_malformed_member_dn_is_kept_and_reported(store):
    full(store, [user("u1", "uid=a,dc=x"),
                 group("g1", "cn=g,dc=x", ["uid=a,dc=x", "uid=broken\\zz,dc=x", "cn=\\ff,dc=x"])])
    assert [m["id"] for m in store.members_of("d", "g1")].count("u1") == 1
    status = store.status("d")
    items = [p for p in status["problems"]["items"] if p["id"] == "g1"]
    assert {p["code"] for p in items} == {"bad_member_dn"} and len(items) == 2
    assert all(p["dn"] == "cn=g,dc=x" for p in items)
    assert status["unresolved_members"]["count"] == 2
    assert store.entry("d", "u1") is not None  # the rest synced


def test_member_loop_is_reported_and_both_groups_kept(store):
    full(store, [group("ga", "cn=A,dc=x", ["cn=b,dc=x"]), group("gb", "cn=B,dc=x", ["CN=a,DC=x"]),
                 group("gc", "cn=C,dc=x", ["cn=a,dc=x"])])
    loops = store.status("d")["member_loops"]
    assert len(loops) == 1 and {g["id"] for g in loops[0]} == {"ga", "gb"}
    assert store.groups_of("d", "ga") == [{"id": "gb", "dn": "cn=B,dc=x"},
                                          {"id": "gc", "dn": "cn=C,dc=x"}]


def test_agent_problems_and_binary_export(store, tmp_path):
    photo = bytes(range(256))
    rec = user("u1", "uid=a,dc=x", encodings={"photo": "base64"},
               problems=[{"code": "binary_in_text", "attribute": "cn", "message": "cn is not UTF-8"}])
    rec["attributes"]["photo"] = base64.b64encode(photo).decode()
    full(store, [rec, user("u2", "uid=b,dc=x")])
    out = tmp_path / "x.csv"
    store.export_csv("d", out)
    reader = csv.DictReader(out.open())
    assert "photo;base64" in reader.fieldnames
    by_id = {r["id"]: r for r in reader}
    assert base64.b64decode(by_id["u1"]["photo;base64"]) == photo and by_id["u2"]["photo;base64"] == ""
    [p] = store.problems("d")["items"]
    assert p == {"id": "u1", "dn": "uid=a,dc=x", "code": "binary_in_text", "message": "cn is not UTF-8",
                 "attribute": "cn"}
    incremental(store, [user("u1", "uid=a,dc=x")], 4)  # fixed in the directory: the problem clears
    assert store.problems("d")["entries"] == 0


def test_migration_from_version_0_keeps_everything(tmp_path):
    """An identity.db written before issue 12 gains keys and the relation in place."""
    path = tmp_path / "identity.db"
    db = sqlite3.connect(path)
    db.executescript("""
    CREATE TABLE entries (directory TEXT NOT NULL, id TEXT NOT NULL, kind TEXT NOT NULL, dn TEXT NOT NULL,
        attributes TEXT NOT NULL, members TEXT, disabled INTEGER, password_hashes TEXT,
        PRIMARY KEY (directory, id)) WITHOUT ROWID;
    CREATE TABLE staging (directory TEXT NOT NULL, id TEXT NOT NULL, kind TEXT NOT NULL, dn TEXT NOT NULL,
        attributes TEXT NOT NULL, members TEXT, disabled INTEGER, password_hashes TEXT,
        PRIMARY KEY (directory, id)) WITHOUT ROWID;
    CREATE TABLE directories (directory TEXT PRIMARY KEY, cursor TEXT, stream_mode TEXT,
        stream_instance TEXT, synced_at REAL, full_synced_at REAL, last_change REAL,
        applied INTEGER NOT NULL DEFAULT 0);
    CREATE TABLE applied (directory TEXT NOT NULL, instance_id TEXT NOT NULL,
        applied_through INTEGER NOT NULL, updated_at REAL NOT NULL, PRIMARY KEY (directory, instance_id));
    """)
    db.execute("INSERT INTO entries VALUES ('d','u1','user',?,'{\"username\":\"s\"}',NULL,0,NULL)",
               (SMITH_ENTRY,))
    db.execute("INSERT INTO entries VALUES ('d','g1','group','cn=g,dc=x','{}',?,NULL,NULL)",
               (json.dumps([SMITH_MEMBER]),))
    db.execute("INSERT INTO directories (directory, cursor) VALUES ('d', 'c0')")
    db.execute("INSERT INTO applied VALUES ('d', 'i1', 42, 0)")
    db.commit()
    db.close()
    store = DirectoryStore(path)
    try:
        assert store.cursor("d") == "c0" and store.applied_through("d", "i1") == 42
        assert store.groups_of("d", "u1") == [{"id": "g1", "dn": "cn=g,dc=x"}]
        assert store.entry("d", "g1")["members"] == [SMITH_MEMBER]
    finally:
        store.close()
    again = DirectoryStore(path)  # a second open does not migrate twice
    assert again.members_of("d", "g1")[0]["id"] == "u1"
    again.close()


def test_group_update_rewrites_only_the_changed_memberships(store):
    full(store, [user("u1", "uid=a,dc=x"), user("u2", "uid=b,dc=x"),
                 group("g1", "cn=g,dc=x", ["uid=a,dc=x", "uid=b,dc=x"])])
    incremental(store, [group("g1", "cn=g,dc=x", ["UID=A,DC=X", "uid=c,dc=x"])], 4)
    got = {(m["id"], m["dn"]) for m in store.members_of("d", "g1")}
    assert got == {("u1", "UID=A,DC=X"), (None, "uid=c,dc=x")}  # new spelling shown, b gone
    incremental(store, [group("g1", "cn=g,dc=x", [])], 5)
    assert store.members_of("d", "g1") == [] and store.groups_of("d", "u1") == []
