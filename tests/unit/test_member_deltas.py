"""Member deltas (issue 12): a small change of a large group travels as a change of its
member list; the agent makes it only on top of what it sent, home applies it only on
top of the list it was made from and otherwise asks for a full sync."""

from __future__ import annotations

import json

import pytest

from tether import protocol as p
from tether.agent.directory.deltas import MemberMemory
from tether.home.directorystore import DirectoryStore

BASE = "ou=people,dc=example,dc=org"
GROUP_DN = "cn=everyone,ou=groups,dc=example,dc=org"


def members(n, start=0):
    return [f"uid=m{i:05d},{BASE}" for i in range(start, start + n)]


def group(ms, gid="g1", dn=GROUP_DN, **extra):
    return {"op": "upsert", "kind": "group", "id": gid, "dn": dn, "attributes": {"name": "everyone"},
            "members": list(ms), **extra}


def user(rid, dn):
    return {"op": "upsert", "kind": "user", "id": rid, "dn": dn, "attributes": {"username": rid}}


def stream(mode, records):
    return [{"type": "begin", "mode": mode, "directory": "d"},
            {"type": "chunk", "seq": 1, "changes": records},
            {"type": "end", "seq": 2, "mode": mode, "cursor": f"c-{mode}", "count": len(records)}]


def through(memory, mode, records):
    return [r for m in memory.stream(stream(mode, records)) if m["type"] == "chunk"
            for r in m["changes"]]


# ------------------------------------------------------------------ agent side

def test_a_small_change_of_a_remembered_large_group_becomes_a_delta():
    memory = MemberMemory(min_members=10)
    first = members(50)
    assert through(memory, "full", [group(first)]) == [group(first)]
    changed = first[1:] + [f"uid=new,{BASE}"]
    (out,) = through(memory, "incremental", [group(changed)])
    assert out["op"] == p.MEMBER_DELTA_OP and "members" not in out
    assert (out["base_count"], out["add"], out["remove"]) == (50, [f"uid=new,{BASE}"], [first[0]])
    assert out["attributes"] == {"name": "everyone"} and out["dn"] == GROUP_DN
    (again,) = through(memory, "incremental", [group(changed + [f"uid=more,{BASE}"])])
    assert again["base_count"] == 50 and again["add"] == [f"uid=more,{BASE}"]


def test_whole_records_when_nothing_is_known_or_the_change_is_large():
    memory = MemberMemory(min_members=10)
    small = members(5)
    through(memory, "full", [group(small), group(members(40), gid="g2")])
    assert through(memory, "incremental", [group(small[1:], )])[0]["op"] == "upsert"  # too small
    big_change = members(40, start=100)
    assert through(memory, "incremental", [group(big_change, gid="g2")])[0]["op"] == "upsert"
    assert through(memory, "incremental", [group(members(40), gid="g3")])[0]["op"] == "upsert"


def test_a_failed_attempt_a_delete_or_a_full_sync_forgets():
    memory = MemberMemory(min_members=10)
    through(memory, "full", [group(members(40))])
    through(memory, "incremental", [{"op": "delete", "id": "g1", "dn": GROUP_DN}])
    assert through(memory, "incremental", [group(members(41))])[0]["op"] == "upsert"
    memory.forget()
    assert through(memory, "incremental", [group(members(42))])[0]["op"] == "upsert"
    assert through(memory, "incremental", [group(members(43))])[0]["op"] == p.MEMBER_DELTA_OP
    # a full stream always sends whole records
    assert through(memory, "full", [group(members(44))])[0]["op"] == "upsert"


def test_memory_is_bounded():
    memory = MemberMemory(min_members=10, max_remembered=60)
    through(memory, "full", [group(members(40)), group(members(40), gid="g2")])
    assert memory.total <= 60 and list(memory.groups) == ["g1"]


def test_received_deltas_are_checked():
    good = p.member_delta(group(members(3)), 3, [f"uid=x,{BASE}"], [])
    assert p.check_member_delta(good) == (3, [f"uid=x,{BASE}"], [])
    for bad in ({**good, "base_count": -1}, {**good, "base_count": True}, {**good, "add": "x"},
                {**good, "add": [1]}, {**good, "add": ["a", "a"]},
                {**good, "add": ["a"], "remove": ["a"]}, {**good, "kind": "user"},
                {**good, "add": ["a"] * (p.MAX_DELTA_VALUES + 1)}):
        with pytest.raises(p.ProtocolError):
            p.check_member_delta(bad)


# ------------------------------------------------------------------ home side

@pytest.fixture
def store(tmp_path):
    s = DirectoryStore(tmp_path / "identity.db")
    yield s
    s.close()


def apply(store, msgs, seq):
    return store.apply_batch("d", "i1", [{"seq": seq + i, "message": m} for i, m in enumerate(msgs)])


def chunk(records):
    return {"type": "chunk", "seq": 1, "changes": records}


def stored(store):
    row = store.db.execute("SELECT members FROM entries WHERE id = 'g1'").fetchone()
    return json.loads(row[0])


def test_home_applies_a_delta_like_the_whole_record(store):
    ms = members(30)
    joiner = "uid=Smith\\, John," + BASE
    store_ = store
    apply(store_, stream("full", [user("u1", f"uid=m00000,{BASE}"),
                                           user("u2", "uid=smith\\2C john," + BASE), group(ms)]), 1)
    delta = p.member_delta(group(ms, attributes={"name": "all"}), 30, [joiner], [ms[0]])
    result = apply(store_, [chunk([delta])], 10)
    assert not result.resync_wanted and result.records == 1
    assert stored(store_) == ms[1:] + [joiner]
    ids = sorted(m["id"] or "-" for m in store_.members_of("d", "g1"))
    assert ids.count("-") == 29 and "u2" in ids and "u1" not in ids
    assert store_.entry("d", "g1")["attributes"] == {"name": "all"}
    # the same delta again (home wrote the read-back first, or a replay): nothing changes
    again = apply(store_, [chunk([delta])], 11)
    assert not again.resync_wanted and stored(store_) == ms[1:] + [joiner]


def test_home_refuses_a_delta_made_for_another_list_and_asks_for_a_full_sync(store):
    ms = members(30)
    apply(store, stream("full", [group(ms)]), 1)
    wrong_base = p.member_delta(group(ms), 29, [f"uid=new,{BASE}"], [])
    absent = p.member_delta(group(ms), 30, [], [f"uid=nobody,{BASE}"])
    unknown = p.member_delta(group(ms, gid="g9"), 30, [f"uid=new,{BASE}"], [])
    for seq, delta in enumerate((wrong_base, absent, unknown), start=10):
        result = apply(store, [chunk([delta])], seq)
        assert result.resync_wanted and "full sync" in result.notes[0], result.notes
        assert stored(store) == ms
    assert store.applied_through("d", "i1") == 12  # applied as a batch: the spool moves on


def test_a_malformed_member_in_a_delta_is_reported_with_its_group(store):
    ms = members(30)
    apply(store, stream("full", [group(ms)]), 1)
    apply(store, [chunk([p.member_delta(group(ms), 30, ["not a dn"], [])])], 10)
    problems = store.problems("d")["items"]
    assert [(x["id"], x["code"]) for x in problems] == [("g1", "bad_member_dn")]
    apply(store, [chunk([p.member_delta(group(ms), 31, [], ["not a dn"])])], 11)
    assert store.problems("d")["items"] == []


def test_a_malformed_delta_refuses_the_batch(store):
    from tether.home.directorystore import DirectoryStoreError
    apply(store, stream("full", [group(members(3))]), 1)
    with pytest.raises(DirectoryStoreError):
        apply(store, [chunk([{**p.member_delta(group(members(3)), 3, [], []), "add": [5]}])], 10)


# ------------------------------------------------------------------ accesslog reqMod

def _config():
    from tether.agent.directory.config import load_config
    return load_config({"name": "d", "kind": "openldap", "servers": ["localhost:1"], "tls": "plain",
                        "allow_plain": True, "bind_dn": "cn=x", "bind_password": "x",
                        "base_dns": ["dc=example,dc=org"]})


def _modify(*mods):
    return {"type": "modify", "mods": [m.encode() for m in mods]}


def test_logged_member_changes_apply_to_the_remembered_list():
    from tether.agent.directory.incremental_openldap import member_changes
    config = _config()
    known = frozenset(members(3))
    new = f"uid=X\\2C y,{BASE}"
    after = member_changes(config, [_modify(f"member:+ {new}", f"member:- {members(1)[0]}",
                                            "modifyTimestamp:= 20261205123611Z"),
                                    _modify("description:= hello")], known)
    assert sorted(after) == sorted(members(3)[1:] + [new])
    # anything the log alone cannot tell: read the group whole
    for history in ([_modify(f"member:= {new}")], [_modify("member:-")],
                    [_modify(f"member:+ {members(1)[0]}")],           # added while present
                    [_modify(f"member:- uid=absent,{BASE}")],          # deleted while absent
                    [{"type": "modrdn", "mods": None}], [{"type": "add", "mods": None}],
                    [_modify(f"member;x-opt:+ {new}")]):
        assert member_changes(config, history, known) is None, history


def test_a_base64_column_holds_base64_in_every_row(store, tmp_path):
    """binary_in_text makes a field base64 in one row: the other rows' text is base64 too."""
    import base64
    import csv
    bad = {**user("u1", f"uid=a,{BASE}"), "attributes": {"username": "a", "note": "/w=="},
           "encodings": {"note": "base64"}}
    good = {**user("u2", f"uid=b,{BASE}"), "attributes": {"username": "b", "note": "plain"}}
    apply(store, stream("full", [bad, good]), 1)
    store.export_csv("d", tmp_path / "out.csv")
    rows = {r["id"]: r for r in csv.DictReader(open(tmp_path / "out.csv", newline=""))}
    assert rows["u1"]["note;base64"] == "/w=="
    assert base64.b64decode(rows["u2"]["note;base64"]) == b"plain"
