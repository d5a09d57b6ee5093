"""Home keeps why a directory does not sync (home/directorystore/ `error` messages,
home/directories.py check_batch / refusal_error / render)."""

from __future__ import annotations

import json
import sqlite3

import pytest

from tether import protocol as p
from tether.home import directories
from tether.home.errors import HomeError, RequestFailed
from tether.home.directorystore import DirectoryStoreError, DirectoryStore


@pytest.fixture
def store(tmp_path):
    s = DirectoryStore(tmp_path / "identity.db")
    yield s
    s.close()


def user(rid, name):
    return {"op": "upsert", "kind": "user", "id": rid, "dn": f"uid={name},ou=people,dc=x",
            "attributes": {"username": name}}


def stream(mode, records, cursor):
    return [{"type": "begin", "mode": mode, "directory": "d"},
            {"type": "chunk", "seq": 1, "changes": records},
            {"type": "end", "seq": 2, "mode": mode, "cursor": cursor, "count": len(records)}]


def error(code="bind_failed", message="invalid credentials for cn=sync", **extra):
    return {"type": "error", "directory": "d", "code": code, "message": message,
            "hint": "check the bind DN and password", "server": "ldap1:636", "at": 1700000000.5,
            **extra}


def entries(messages, first_seq=1):
    return [{"seq": first_seq + i, "message": m} for i, m in enumerate(messages)]


def test_error_is_stored_without_touching_records_or_cursor(store):
    store.apply_batch("d", "i1", entries(stream("full", [user("u1", "a")], "c1")))
    result = store.apply_batch("d", "i1", entries([error()], first_seq=4))
    assert result.applied == 1 and result.records == 0 and result.applied_through == 4
    assert store.cursor("d") == "c1"
    assert [e["id"] for e in store.entries("d")] == ["u1"]
    status = store.status("d")
    assert status["error"]["code"] == "bind_failed"
    assert status["error"]["message"] == "invalid credentials for cn=sync"
    assert status["error"]["hint"] == "check the bind DN and password"
    assert status["error"]["server"] == "ldap1:636"
    assert status["error"]["instance"] == "i1"
    assert status["error"]["at"] == 1700000000.5


def test_later_error_replaces_earlier_and_applied_end_clears(store):
    store.apply_batch("d", "i1", entries([error(), error("server_down", "ldap1 refused")]))
    assert store.last_error("d")["code"] == "server_down"
    store.apply_batch("d", "i1", entries(stream("full", [user("u1", "a")], "c1"), first_seq=3))
    assert store.last_error("d") is None
    assert store.status("d")["error"] is None


def test_error_mid_stream_keeps_the_stream_open(store):
    msgs = stream("full", [user("u1", "a")], "c1")
    store.apply_batch("d", "i1", entries([msgs[0], msgs[1], error()]))
    assert store.status("d")["stream_mode"] == "full"
    assert store.last_error("d")["code"] == "bind_failed"
    assert store.counts("d")["staging"] == 1 and store.counts("d")["users"] == 0


def test_end_without_begin_does_not_clear(store):
    store.apply_batch("d", "i1", entries([error()]))
    result = store.apply_batch("d", "i2", entries([stream("full", [], "c9")[2]]))
    assert result.resync_wanted
    assert store.last_error("d")["code"] == "bind_failed"


def test_resent_error_applies_once(store):
    store.apply_batch("d", "i1", entries([error()]))
    first = store.last_error("d")["received_at"]
    result = store.apply_batch("d", "i1", entries([error("tls", "name mismatch")]))
    assert result.skipped == 1 and result.applied == 0
    assert store.last_error("d") == {**store.last_error("d"), "code": "bind_failed",
                                     "received_at": first}


@pytest.mark.parametrize("bad", [{"code": 5}, {"message": None}, {"code": ""},
                                 {"at": "yesterday"}, {"at": True}])
def test_malformed_error_refuses_the_batch(store, bad):
    with pytest.raises(DirectoryStoreError):
        store.apply_batch("d", "i1", entries([stream("full", [], "c1")[0], error(**bad)]))
    assert store.applied_through("d", "i1") == 0
    assert store.last_error("d") is None


def test_record_error_from_home(store):
    store.record_error("d", "i7", {"code": "config", "message": "unknown key 'x'", "hint": "fix"})
    got = store.last_error("d")
    assert (got["code"], got["instance"], got["at"], got["server"]) == ("config", "i7", None, None)


def test_schema_added_to_an_older_file(tmp_path):
    path = tmp_path / "identity.db"
    DirectoryStore(path).close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE directory_errors")  # as a file written before errors were kept
    db.commit()
    db.close()
    for _ in range(2):  # opening twice changes nothing more
        s = DirectoryStore(path)
        s.apply_batch("d", "i1", entries([error()]))
        assert s.last_error("d")["code"] == "bind_failed"
        s.close()


def test_check_batch_accepts_error_messages():
    body = {"directory": "d", "entries": entries([error()])}
    assert directories.check_batch(body) == body["entries"]
    with pytest.raises(HomeError, match="begin, chunk, end or error"):
        directories.check_batch({"directory": "d", "entries": entries([{"type": "warning"}])})


def test_refusal_error_parses_engine_detail_or_keeps_protocol_code():
    detail = json.dumps({"directory": "d", "code": "config", "message": "bad mapping",
                         "hint": "fix the directory configuration in home"})
    got = directories.refusal_error(RequestFailed(p.ErrorCode.BAD_CONFIG, detail))
    assert (got["code"], got["message"]) == ("config", "bad mapping")
    got = directories.refusal_error(RequestFailed(p.ErrorCode.NOT_FOUND, "directory 'd' is not "
                                                  "configured on this agent"))
    assert got["code"] == p.ErrorCode.NOT_FOUND.value and "not configured" in got["message"]
    assert "config show" in got["hint"]


def test_render_shows_the_error_line():
    row = {"directory": "d", "cluster": None, "policy": "failover", "primary": None,
           "connectors": ["c1"], "leader": "i1", "users": 0, "groups": 0, "cursor": None,
           "last_change": None, "stream_open": None, "applied_through": {},
           "error": {"code": "bind_failed", "message": "invalid credentials",
                     "hint": "check the bind DN and password", "server": "ldap1:636",
                     "instance": "i1", "at": None}}
    text = directories.render([row], running=True)
    assert ("error: bind_failed: invalid credentials (check the bind DN and password) "
            "[server ldap1:636, instance i1]") in text
    assert "error:" not in directories.render([{**row, "error": None}], running=True)
