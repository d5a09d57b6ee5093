"""The typed change stream: the dicts the engines spool, and the one check both sides run."""

import pytest

from tether import protocol as p
from tether.protocol import changes


def test_messages_encode_to_the_wire_keys_and_decode_back():
    begin = changes.Begin(changes.FULL, "corp", "no cursor")
    chunk = changes.Chunk(1, [{"op": "delete", "id": "1", "dn": "uid=a,dc=x"}])
    end = changes.End(changes.FULL, 1, "c1", 2, {"server": "ldap://a", "failovers": 0})
    error = changes.Error("server_down", "no answer", 5.0, {"directory": "corp", "hint": "h"})
    assert begin.encode() == {"type": "begin", "mode": "full", "directory": "corp",
                              "reason": "no cursor"}
    assert changes.Begin(changes.INCREMENTAL, "corp").encode() == {
        "type": "begin", "mode": "incremental", "directory": "corp"}
    assert chunk.encode() == {"type": "chunk", "seq": 1, "changes": chunk.changes}
    assert end.encode() == {"type": "end", "seq": 2, "mode": "full", "count": 1, "cursor": "c1",
                            "server": "ldap://a", "failovers": 0}
    for message in (begin, chunk, end, error):
        assert changes.decode(message.encode()) == message
    assert error.hint == "h" and error.server is None
    assert changes.Entry(7, chunk.encode()).encode() == {"seq": 7, "message": chunk.encode()}


@pytest.mark.parametrize("message, says", [
    ({"type": "begin", "mode": "partial"}, "begin with mode 'partial'"),
    ({"type": "chunk", "seq": 1}, "chunk without a changes list"),
    ({"type": "end", "cursor": 5}, "end with a cursor that is not a string"),
    ({"type": "error", "code": "", "message": "m"}, "needs string code and message"),
    ({"type": "error", "code": "c", "message": "m", "at": True}, "must be a unix time"),
    ({"type": "warning"}, "stream message type 'warning'"),
    ({"type": "part", "index": 0}, ""),
])
def test_the_one_check_refuses_with_bad_type(message, says):
    with pytest.raises(p.ProtocolError) as refused:
        changes.decode(message)
    assert refused.value.code is p.ErrorCode.BAD_TYPE and says in refused.value.detail


def test_the_agent_cannot_build_what_home_refuses():
    with pytest.raises(p.ProtocolError):
        changes.Begin("sideways", "corp")
    with pytest.raises(p.ProtocolError):
        changes.End(changes.FULL, 0, cursor=3)


def test_batch_positions_increase_and_after_is_below_them():
    chunk = changes.Chunk(1, []).encode()
    body = {"entries": [changes.Entry(3, chunk).encode(), changes.Entry(4, chunk).encode()],
            "after": 2}
    assert changes.check_entries(body) == body["entries"]
    for bad in ({"entries": [{"seq": 4, "message": chunk}, {"seq": 4, "message": chunk}]},
                {"entries": [{"seq": 4, "message": chunk}], "after": 4},
                {"entries": [{"seq": -1, "message": chunk}]},
                {"entries": "nope"}):
        with pytest.raises(p.ProtocolError):
            changes.check_entries(bad)
