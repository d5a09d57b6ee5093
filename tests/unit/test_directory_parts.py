"""A record larger than a frame travels in parts (tether/protocol/parts.py): the
agent's spool entries (agent/directory/managed.py) and home's reassembly
(home/directorystore/), exactly once across batches, re-sends and abandoned sets."""

from __future__ import annotations

import json

import pytest

from tether import protocol as p
from tether.agent.directory.drain import BATCH_BUDGET, ENTRY_OVERHEAD
from tether.agent.directory.managed import ENTRY_BUDGET, spool_entries
from tether.home import directories
from tether.home.errors import HomeError
from tether.home.directorystore import DirectoryStoreError, DirectoryStore

MEMBERS = [f"uid=m{i:06d},ou=people,dc=example,dc=org" for i in range(100_000)]


@pytest.fixture
def store(tmp_path):
    s = DirectoryStore(tmp_path / "identity.db")
    yield s
    s.close()


def big_group(members=MEMBERS, rid="g1"):
    return {"op": "upsert", "kind": "group", "id": rid, "dn": "cn=all,ou=groups,dc=example,dc=org",
            "attributes": {"name": "all \u00e9\u4e2d"}, "members": members}


def stream(mode, records, cursor="c1"):
    return [{"type": "begin", "mode": mode, "directory": "d"},
            {"type": "chunk", "seq": 1, "changes": records},
            {"type": "end", "seq": 2, "mode": mode, "cursor": cursor, "count": len(records)}]


def entries(stream_, first_seq=1):
    """The spool entries the follower writes, as home receives them."""
    return [{"seq": first_seq + n, "message": json.loads(data)}
            for n, (_, data) in enumerate(spool_entries(stream_))]


def test_a_100k_member_group_is_cut_into_parts_that_fit_entries_and_frames():
    out = list(spool_entries(stream("full", [big_group()])))
    parts = [m for m, _ in out if m["type"] == p.PART_TYPE]
    assert len(parts) > 20 and [m["index"] for m in parts] == list(range(len(parts)))
    assert all(len(data) <= ENTRY_BUDGET and len(data) + ENTRY_OVERHEAD < BATCH_BUDGET
               for _, data in out)
    joined = p.join_parts([p.Part.from_message(m) for m in parts])
    assert joined["type"] == "chunk" and joined["changes"][0]["members"] == MEMBERS


def test_home_applies_the_group_once_when_its_last_part_arrives(store):
    sent = entries(stream("full", [big_group()]))
    for i in range(0, len(sent), 3):  # several batches, like the drain's window
        store.apply_batch("d", "i1", sent[i:i + 3])
        if i + 3 < len(sent):
            assert store.counts("d")["groups"] == 0  # nothing visible before the end
    assert store.entry("d", "g1")["members"] == MEMBERS
    assert store.cursor("d") == "c1"
    # a re-send after a lost answer changes nothing
    result = store.apply_batch("d", "i1", sent)
    assert result.applied == 0 and result.skipped == len(sent)
    # then one member more, incrementally, also in parts
    more = entries(stream("incremental", [big_group(MEMBERS + ["uid=new,dc=example,dc=org"])], "c2"),
                   first_seq=len(sent) + 1)
    store.apply_batch("d", "i1", more)
    assert store.entry("d", "g1")["members"][-1] == "uid=new,dc=example,dc=org"
    assert store.cursor("d") == "c2"


def test_an_abandoned_set_is_dropped_and_the_replay_applies(store):
    sent = entries(stream("incremental", [big_group()]))
    cut = len(sent) // 2
    store.apply_batch("d", "i1", sent[:cut])  # the agent restarted mid-way...
    replay = entries(stream("incremental", [big_group()]), first_seq=cut + 1)
    store.apply_batch("d", "i1", replay)  # ...and replayed the stream from its cursor
    assert store.entry("d", "g1")["members"] == MEMBERS


def test_a_part_without_its_predecessors_is_refused(store):
    sent = [e for e in entries(stream("incremental", [big_group()]))
            if e["message"]["type"] == p.PART_TYPE]
    with pytest.raises(DirectoryStoreError, match="part 1 of"):
        store.apply_batch("d", "i1", [{"seq": 1, "message": sent[1]["message"]}])
    assert store.applied_through("d", "i1") == 0


@pytest.mark.parametrize("change, error", [
    ({"count": p.MAX_PARTS + 1}, "outside"),
    ({"count": 1}, "outside"),
    ({"index": 5, "count": 5}, "not below"),
    ({"size": p.MAX_MESSAGE_BYTES + 1}, "at most"),
    ({"text": "x" * (p.MAX_PART_BYTES + 1)}, "above"),
    ({"index": True}, "index must be"),
    ({"text": None}, "text must be"),
])
def test_malformed_parts_are_refused_at_the_batch_check(change, error):
    part = {"type": "part", "index": 0, "count": 2, "size": 10, "text": "{}", **change}
    with pytest.raises(HomeError, match=error):
        directories.check_batch({"directory": "d", "entries": [{"seq": 1, "message": part}]})


def test_parts_that_do_not_join_to_a_message_are_refused():
    parts = p.split_parts(b'{"type":"part","index":0}', limit=10)
    with pytest.raises(p.ProtocolError, match="not to another part"):
        p.join_parts(parts)
    with pytest.raises(p.ProtocolError, match="announced"):
        p.join_parts([p.Part(0, 2, 99, "{"), p.Part(1, 2, 99, "}")])
    with pytest.raises(ValueError, match="more than"):
        p.split_parts(b"x" * (p.MAX_MESSAGE_BYTES + 1))


def test_cuts_fall_between_characters():
    text = ("{\"a\":\"" + "\u00e9\u4e2d\U0001F600" * 1000 + "\"}").encode()
    parts = p.split_parts(text, limit=7)
    assert "".join(x.text for x in parts).encode() == text
    assert all(len(x.text.encode()) <= 7 for x in parts)


# ---- no silent stall (home/directories.py stall, on_flow; agent heartbeat report)

def test_a_refused_batch_is_a_stall_at_once():
    error = {"code": "changes_refused", "message": "home refused a batch of changes: x",
             "hint": "fix it", "at": 5.0}
    assert directories.stall(["c-a"], None, error)["reason"].startswith("home refused")


def test_no_connected_appliance_is_a_stall():
    found = directories.stall(["c-a"], {"connected_instances": [], "leader": None}, None)
    assert "no appliance" in found["reason"] and "c-a" in found["hint"]


def test_the_leaders_flow_report_shows_a_stall_and_its_absence_clears_it():
    running = {"connected_instances": ["i1"], "leader": "i1",
               "flow": directories.clean_flow({"pending": 7, "waiting_s": 45.0, "following": True,
                                               "error": None})}
    found = directories.stall(["c-a"], running, None)
    assert "7 spooled changes have waited" in found["reason"] and found["pending"] == 7
    running["flow"] = directories.clean_flow({"pending": 1, "waiting_s": 0.5, "error": None})
    assert directories.stall(["c-a"], running, None) is None
    running["flow"] = directories.clean_flow({"pending": 0, "waiting_s": 0, "error": {
        "code": "server_down", "message": "cannot connect", "hint": "start it", "extra": "x" * 9000}})
    found = directories.stall(["c-a"], running, None)
    assert "server_down: cannot connect" in found["reason"] and found["hint"] == "start it"
    running["flow"] = None
    assert directories.stall(["c-a"], running, None) is None


def test_flow_reports_are_bounded():
    flow = directories.clean_flow({"pending": "lots", "waiting_s": -3, "following": 1,
                                   "error": {"code": "x" * 10_000, "message": 5}})
    assert flow["pending"] == 0 and flow["waiting_s"] == 0.0 and flow["following"] is False
    assert flow["error"] == {"code": "x" * directories.FLOW_TEXT}
