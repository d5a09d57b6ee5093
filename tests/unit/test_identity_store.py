"""Home's identity store (home/directorystore/): snapshot swap, exactly once, ids, export."""

from __future__ import annotations

import csv
import stat

import pytest

from tether.home.directorystore import DirectoryStoreError, DirectoryStore, csv_columns


@pytest.fixture
def store(tmp_path):
    s = DirectoryStore(tmp_path / "identity.db")
    yield s
    s.close()


def user(rid, name, dn=None, **extra):
    return {"op": "upsert", "kind": "user", "id": rid, "dn": dn or f"uid={name},ou=people,dc=x",
            "attributes": {"username": name, "mail": f"{name}@x"}, **extra}


def group(rid, name, members):
    return {"op": "upsert", "kind": "group", "id": rid, "dn": f"cn={name},ou=groups,dc=x",
            "attributes": {"name": name}, "members": members}


def stream(mode, records, cursor, chunk=2):
    msgs = [{"type": "begin", "mode": mode, "directory": "d"}]
    for n, i in enumerate(range(0, len(records), chunk), 1):
        msgs.append({"type": "chunk", "seq": n, "changes": records[i:i + chunk]})
    msgs.append({"type": "end", "mode": mode, "cursor": cursor, "count": len(records)})
    return msgs


def entries(messages, first_seq=1):
    return [{"seq": first_seq + i, "message": m} for i, m in enumerate(messages)]


def names(store, directory="d"):
    return sorted(e["attributes"]["username"] for e in store.entries(directory, "user"))


def test_file_is_owner_only_wal(tmp_path, store):
    assert stat.S_IMODE((tmp_path / "identity.db").stat().st_mode) == 0o600
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_full_sync_replaces_snapshot_only_at_end(store):
    store.apply_batch("d", "i1", entries(stream("full", [user("1", "ann"), user("2", "bob")], "c1")))
    assert names(store) == ["ann", "bob"] and store.cursor("d") == "c1"
    second = stream("full", [user("2", "bob"), user("3", "cid"), user("4", "dan")], "c2")
    # everything but the end: the old snapshot is still what readers see
    result = store.apply_batch("d", "i1", entries(second[:-1], first_seq=10))
    assert not result.swapped
    assert names(store) == ["ann", "bob"] and store.cursor("d") == "c1"
    assert store.counts("d")["staging"] == 3
    result = store.apply_batch("d", "i1", entries(second[-1:], first_seq=10 + len(second) - 1))
    assert result.swapped and result.cursor == "c2"
    assert names(store) == ["bob", "cid", "dan"]  # ann is gone: not in the new snapshot
    assert store.cursor("d") == "c2" and store.counts("d")["staging"] == 0


def test_interrupted_full_sync_keeps_old_snapshot_and_is_discarded(store):
    store.apply_batch("d", "i1", entries(stream("full", [user("1", "ann")], "c1")))
    broken = stream("full", [user("9", "zed"), user("8", "yan"), user("7", "xi")], "never")
    store.apply_batch("d", "i1", entries(broken[:2], first_seq=5))  # begin + one chunk, then dies
    assert names(store) == ["ann"]
    # the agent restarts and resumes incrementally from the stored cursor
    inc = stream("incremental", [user("2", "bob")], "c2")
    store.apply_batch("d", "i1", entries(inc, first_seq=7))
    assert names(store) == ["ann", "bob"]  # the half full sync never swapped in
    assert store.counts("d")["staging"] == 0 and store.cursor("d") == "c2"


def test_exactly_once_with_resent_batches(store):
    msgs = stream("full", [user(str(i), f"u{i}") for i in range(6)], "c1")
    first = store.apply_batch("d", "i1", entries(msgs[:3]))
    assert first.applied_through == 3 and first.applied == 3
    # response lost: the agent re-sends from seq 1 plus the rest
    again = store.apply_batch("d", "i1", entries(msgs))
    assert again.skipped == 3 and again.applied == len(msgs) - 3
    assert again.applied_through == len(msgs) and again.swapped
    assert len(names(store)) == 6
    # incremental delete re-sent: applied once, second time skipped (and harmless anyway)
    inc = entries(stream("incremental", [{"op": "delete", "id": "0", "dn": "x"}], "c2"),
                  first_seq=len(msgs) + 1)
    store.apply_batch("d", "i1", inc)
    assert store.apply_batch("d", "i1", inc).applied == 0
    assert len(names(store)) == 5 and store.applied_through("d", "i1") == inc[-1]["seq"]
    # per instance: another instance's seq numbers are its own
    assert store.applied_through("d", "i2") == 0


def test_delete_and_rename_by_id(store):
    store.apply_batch("d", "i1", entries(stream("full", [user("u1", "ann"), user("u2", "bob")],
                                                "c1")))
    changes = [user("u1", "ann", dn="uid=ann,ou=moved,dc=x"),  # rename/move: same id
               {"op": "delete", "id": "u2", "dn": "uid=bob,ou=people,dc=x"},
               {"op": "delete", "id": "unknown", "dn": "uid=ghost,dc=x"}]  # no-op
    store.apply_batch("d", "i1", entries(stream("incremental", changes, "c2", chunk=10),
                                         first_seq=10))
    rows = list(store.entries("d"))
    assert [(r["id"], r["dn"]) for r in rows] == [("u1", "uid=ann,ou=moved,dc=x")]
    # delete then re-add of the same id in one chunk keeps the order
    store.apply_batch("d", "i1", entries(stream(
        "incremental", [{"op": "delete", "id": "u1", "dn": "-"}, user("u1", "ann2")], "c3",
        chunk=10), first_seq=20))
    assert names(store) == ["ann2"]


def test_bad_batch_applies_nothing(store):
    store.apply_batch("d", "i1", entries(stream("full", [user("1", "ann")], "c1")))
    bad = entries([{"type": "begin", "mode": "incremental"},
                   {"type": "chunk", "changes": [user("2", "bob"), {"op": "upsert", "id": "3"}]}],
                  first_seq=10)
    with pytest.raises(DirectoryStoreError, match="lacks"):
        store.apply_batch("d", "i1", bad)
    assert names(store) == ["ann"] and store.applied_through("d", "i1") == 3
    with pytest.raises(DirectoryStoreError, match="type"):
        store.apply_batch("d", "i1", entries([{"type": "nope"}], first_seq=10))


def test_end_without_its_begin_is_not_trusted(store):
    store.apply_batch("d", "i1", entries(stream("full", [user("1", "ann")], "c1")))
    msgs = stream("full", [user("2", "bob")], "c-other")
    store.apply_batch("d", "i1", entries(msgs[:1], first_seq=10))     # i1 opens a full stream
    result = store.apply_batch("d", "i2", entries(msgs[1:]))          # i2's orphan chunk + end
    assert result.resync_wanted and result.cursor is None
    assert store.cursor("d") == "c1"           # a cursor without a complete stream is not kept
    assert names(store) == ["ann", "bob"]     # the orphan chunk's whole states went live
    assert store.counts("d")["staging"] == 0  # nothing mixed into i1's staging


def test_directories_are_separate(store):
    store.apply_batch("a", "i1", entries(stream("full", [user("1", "ann")], "ca")))
    store.apply_batch("b", "i1", entries(stream("full", [user("1", "bob")], "cb")))
    store.apply_batch("a", "i1", entries(stream("full", [], "ca2"), first_seq=10))
    assert names(store, "a") == [] and names(store, "b") == ["bob"]
    assert store.directories() == ["a", "b"]
    assert store.status("b")["applied_through"] == {"i1": 3}


def test_record_dropped_advances_without_applying(store):
    assert store.record_dropped("d", "i2", 7) == 7
    assert store.record_dropped("d", "i2", 3) == 7
    result = store.apply_batch("d", "i2", entries(stream("full", [user("1", "ann")], "c"), 6))
    assert result.skipped == 2 and result.applied == 1  # only seq 8 (the end) is new
    assert result.resync_wanted and store.cursor("d") is None  # its begin was dropped
    assert names(store) == []


def test_export_csv(store, tmp_path):
    records = [user("u1", "ann", disabled=True), user("u2", "bob"),
               {**user("u3", "cid"), "attributes": {"username": "cid", "mail": ["a@x", "b@x"]}},
               group("g1", "admins", ["uid=ann,ou=people,dc=x", "uid=bob,ou=people,dc=x"]),
               group("g2", "staff", ["uid=ANN,ou=people,dc=x"])]
    store.apply_batch("d", "i1", entries(stream("full", records, "c1")))
    out = tmp_path / "out.csv"
    doc = store.export_csv("d", out)
    assert doc["users"] == 3 and doc["groups"] == 2
    with open(out, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == csv_columns(["mail", "name", "username"]) == [
        "kind", "id", "dn", "mail", "name", "username", "disabled", "member_of", "members"]
    by_id = {r[1]: dict(zip(rows[0], r)) for r in rows[1:]}
    assert by_id["u1"]["disabled"] == "true" and by_id["u2"]["disabled"] == ""
    assert by_id["u1"]["member_of"] == "cn=admins,ou=groups,dc=x|cn=staff,ou=groups,dc=x"
    assert by_id["u3"]["mail"] == "a@x|b@x" and by_id["u3"]["member_of"] == ""
    assert by_id["g1"]["members"] == "uid=ann,ou=people,dc=x|uid=bob,ou=people,dc=x"
    assert by_id["g1"]["name"] == "admins" and by_id["g1"]["username"] == ""
    assert [r[0] for r in rows[1:]] == ["user"] * 3 + ["group"] * 2
    assert not list(tmp_path.glob(".out.csv*"))  # no temp file left behind


def test_full_sync_of_many_users_is_one_transaction_per_batch(store):
    """Throughput is measured by bench/; here: a large stream applies completely and the
    swap replaces every row (no wall-clock assertion)."""
    records = [user(str(i), f"u{i}") for i in range(5000)]
    msgs = stream("full", records, "c1", chunk=500)
    seq = 1
    for i in range(0, len(msgs), 4):
        store.apply_batch("d", "i1", entries(msgs[i:i + 4], first_seq=seq))
        seq += len(msgs[i:i + 4])
    assert store.counts("d")["users"] == 5000 and store.cursor("d") == "c1"


def test_pipelined_batches_apply_in_order_exactly_once(store):
    """Batches sent back to back (each naming the previous one's last seq in
    ``after``) apply in order; re-sending the whole window changes nothing."""
    msgs = entries(stream("full", [user(str(i), f"u{i}") for i in range(6)], "c1"))
    windows = [(msgs[:2], None), (msgs[2:4], 2), (msgs[4:], 4)]
    for batch, after in windows:
        result = store.apply_batch("d", "i1", batch, after)
        assert not result.out_of_order and result.applied_through == batch[-1]["seq"]
    assert len(names(store)) == 6 and store.cursor("d") == "c1"
    for batch, after in windows:  # the answers were lost: the agent sends the window again
        assert store.apply_batch("d", "i1", batch, after).applied == 0
    assert store.applied_through("d", "i1") == msgs[-1]["seq"] and len(names(store)) == 6


def test_batch_whose_previous_batch_is_missing_is_refused(store):
    """A pipelined batch arriving without the one before it (that one failed, or
    took another socket) applies nothing, so its predecessor's changes are not
    skipped for good; once the predecessor lands, the batch applies."""
    msgs = entries(stream("full", [user(str(i), f"u{i}") for i in range(4)], "c1"))
    first, second = msgs[:3], msgs[3:]
    refused = store.apply_batch("d", "i1", second, after=3)
    assert refused.out_of_order and refused.applied == 0 and refused.applied_through == 0
    assert store.applied_through("d", "i1") == 0 and store.counts("d")["staging"] == 0
    assert store.apply_batch("d", "i1", first).applied_through == 3
    done = store.apply_batch("d", "i1", second, after=3)
    assert not done.out_of_order and done.swapped and len(names(store)) == 4
