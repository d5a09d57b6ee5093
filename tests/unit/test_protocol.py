"""tether.protocol: codec validation and the sans-I/O Session rules, no sockets."""

from __future__ import annotations

import json

import pytest

from tether import protocol as p
from tether.protocol import ErrorCode, Kind, Op, ProtocolError, Role, Session


class FakeClock:
    """A clock the test moves by hand (staleness without sleeping)."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


HELLO = {"agent_version": "0.1.0", "image_id": "img-1", "instance_id": None}
HELLO_OK = {"home_version": "0.1.0", "server_time": 1.0, "role": "instance",
            "connector": "acme"}


def wire(**fields) -> str:
    base = {"v": 1, "id": "m1", "kind": "request", "op": "hello", "ts": 1_800_000_000.0,
            "re": None, "seq": None, "body": dict(HELLO)}
    base.update(fields)
    return json.dumps(base)


def pump(src: Session, dst: Session) -> list:
    for text in src.data_to_send():
        dst.receive(text)
    return dst.events_received()


def connected(clock: FakeClock | None = None) -> tuple[Session, Session]:
    clock = clock or FakeClock()
    agent, home = Session(Role.AGENT, clock=clock), Session(Role.HOME, clock=clock)
    agent.request(Op.HELLO, HELLO)
    (req,) = pump(agent, home)
    home.respond(req.message, HELLO_OK)
    (resp,) = pump(home, agent)
    assert isinstance(resp, p.ResponseReceived)
    return agent, home


def error_of(session: Session) -> dict:
    (text,) = session.data_to_send()
    message = p.decode(text)
    assert message.kind is Kind.ERROR
    return message.body


# ------------------------------------------------------------------ codec


def test_round_trip_keeps_every_field():
    message = p.Message(id="abc", kind=Kind.CHUNK, op=Op.SYNC, ts=12.5,
                        body={"changes": [{"dn": "cn=x"}], "cursor": "c1"}, re="r1", seq=3)
    assert p.decode(p.encode(message)) == message


def test_subprotocol_carries_the_version():
    assert p.SUBPROTOCOL == f"tether.v{p.PROTOCOL_VERSION}"


@pytest.mark.parametrize("data, code", [
    (b"\xff\xfe", ErrorCode.MALFORMED),
    ("not json", ErrorCode.MALFORMED),
    ("[1, 2]", ErrorCode.MALFORMED),
    ('{"v": 1}', ErrorCode.MALFORMED),
    (wire(extra=1), ErrorCode.MALFORMED),
    ('{"v":1,"v":1,"id":"a","kind":"event","op":"heartbeat","ts":1,"body":{}}',
     ErrorCode.MALFORMED),
    (wire(ts=float("nan")).replace("NaN", "NaN"), ErrorCode.MALFORMED),
    (wire(v=2), ErrorCode.UNSUPPORTED_VERSION),
    (wire(v="1"), ErrorCode.BAD_TYPE),
    (wire(id=""), ErrorCode.BAD_TYPE),
    (wire(id="x" * 65), ErrorCode.BAD_TYPE),
    (wire(id="bad id"), ErrorCode.BAD_TYPE),
    (wire(kind="shout"), ErrorCode.BAD_TYPE),
    (wire(op="format_disk"), ErrorCode.UNKNOWN_OP),
    (wire(op=5), ErrorCode.BAD_TYPE),
    (wire(ts="now"), ErrorCode.BAD_TYPE),
    (wire(ts=True), ErrorCode.BAD_TYPE),
    (wire(ts=-1), ErrorCode.BAD_TYPE),
    (wire(body=[]), ErrorCode.BAD_TYPE),
    (wire(re="r1"), ErrorCode.BAD_TYPE),
    (wire(seq=1), ErrorCode.BAD_TYPE),
    (wire(kind="response", re=None), ErrorCode.BAD_TYPE),
    (wire(kind="chunk", re="r1", seq=0), ErrorCode.BAD_TYPE),  # hello doesn't stream
    (wire(kind="chunk", op="sync", re="r1", seq=-1, body={"changes": [], "cursor": "c"}),
     ErrorCode.BAD_TYPE),
    (wire(body={"agent_version": 1, "image_id": "i"}), ErrorCode.BAD_TYPE),
    (wire(body={"image_id": "i"}), ErrorCode.BAD_TYPE),
    (wire(body={**HELLO, "socket_index": True}), ErrorCode.BAD_TYPE),
    (wire(kind="error", op=None, re=None, body={"code": 3, "detail": "x"}), ErrorCode.BAD_TYPE),
])
def test_decode_refuses_with_specific_code(data, code):
    with pytest.raises(ProtocolError) as info:
        p.decode(data)
    assert info.value.code is code


def test_decode_refuses_oversized_before_parsing():
    big = wire(body={**HELLO, "pad": "x" * p.MAX_FRAME_BYTES})
    with pytest.raises(ProtocolError) as info:
        p.decode(big.encode())
    assert info.value.code is ErrorCode.TOO_LARGE
    assert info.value.extra["limit"] == p.MAX_FRAME_BYTES


def test_decode_survives_deep_nesting():
    with pytest.raises(ProtocolError) as info:
        p.decode("[" * 100_000 + "]" * 100_000)
    assert info.value.code is ErrorCode.MALFORMED


def test_bad_message_keeps_its_id_for_the_reply():
    with pytest.raises(ProtocolError) as info:
        p.decode(wire(id="keepme", op="nope"))
    assert info.value.message_id == "keepme"


def test_encode_refuses_what_decode_would():
    message = p.Message(id="a", kind=Kind.REQUEST, op=Op.ENROLL, ts=1.0, body={})
    with pytest.raises(ProtocolError) as info:
        p.encode(message)
    assert info.value.code is ErrorCode.BAD_TYPE


def test_encode_refuses_oversized():
    message = p.Message(id="a", kind=Kind.EVENT, op=Op.HEARTBEAT, ts=1.0,
                        body={"pad": "x" * p.MAX_FRAME_BYTES})
    with pytest.raises(ProtocolError) as info:
        p.encode(message)
    assert info.value.code is ErrorCode.TOO_LARGE


# ---------------------------------------------------------------- session


def test_hello_establishes_both_sides():
    agent, home = connected()
    assert agent.established and home.established


def test_agent_cannot_send_before_hello():
    agent = Session(Role.AGENT)
    with pytest.raises(ProtocolError) as info:
        agent.request(Op.ENROLL, {"csr_pem": "x", "sealing_public_key": "k", "machine": {}})
    assert info.value.code is ErrorCode.NOT_HELLO


def test_home_answers_frame_before_hello_with_not_hello():
    clock = FakeClock()
    home = Session(Role.HOME, clock=clock)
    home.receive(p.encode(p.Message(id="e1", kind=Kind.EVENT, op=Op.HEARTBEAT,
                                    ts=clock.now, body={})))
    (event,) = home.events_received()
    assert isinstance(event, p.ProtocolViolation)
    body = error_of(home)
    assert body["code"] == "not_hello"
    assert not home.established


def test_second_hello_is_refused():
    clock = FakeClock()
    agent, home = connected(clock)
    home.receive(wire(id="again", ts=clock.now))
    assert error_of(home)["code"] == "duplicate_hello"


def test_replayed_id_is_refused():
    clock = FakeClock()
    agent, home = connected(clock)
    agent.event(Op.HEARTBEAT, {"uptime": 1.0})
    (text,) = agent.data_to_send()
    home.receive(text)
    assert isinstance(home.events_received()[0], p.EventReceived)
    home.receive(text)
    (violation,) = home.events_received()
    assert violation.error.code is ErrorCode.REPLAY
    assert error_of(home)["code"] == "replay"


@pytest.mark.parametrize("skew", [-301.0, 301.0])
def test_stale_message_is_refused_with_server_time(skew):
    clock = FakeClock()
    home = Session(Role.HOME, clock=clock)
    home.receive(wire(ts=clock.now + skew))
    body = error_of(home)
    assert body["code"] == "stale"
    assert body["server_time"] == clock.now


def test_agent_can_retry_hello_after_stale_with_offset():
    home_clock, agent_clock = FakeClock(), FakeClock(1_800_000_000.0 - 3600)
    agent, home = Session(Role.AGENT, clock=agent_clock), Session(Role.HOME, clock=home_clock)
    agent.request(Op.HELLO, HELLO)
    pump(agent, home)
    (err,) = pump(home, agent)
    assert isinstance(err, p.ErrorReceived) and err.code == "stale"
    agent.clock_offset = err.message.body["server_time"] - agent_clock.now
    agent.request(Op.HELLO, HELLO)
    (req,) = pump(agent, home)
    assert isinstance(req, p.RequestReceived)


def test_seen_ids_are_pruned_after_the_window():
    clock = FakeClock()
    agent, home = connected(clock)
    for _ in range(5):
        agent.event(Op.HEARTBEAT, {})
        pump(agent, home)
    clock.now += p.DEFAULT_WINDOW_SECONDS + 10
    agent.event(Op.HEARTBEAT, {})
    pump(agent, home)
    assert len(home._seen) == 1


def test_replay_memory_is_bounded_and_a_forgotten_id_is_still_refused():
    """65,536 fresh ids used to cost 15.6 MB per socket (issue 11): now the window
    holds MAX_SEEN_IDS, and the timestamp of an id forgotten early becomes a floor."""
    clock = FakeClock()
    agent, home = connected(clock)
    agent.event(Op.HEARTBEAT, {})
    (first,) = agent.data_to_send()
    home.receive(first)
    home.events_received()
    for _ in range(3 * p.MAX_SEEN_IDS):
        clock.now += 0.001
        agent.event(Op.HEARTBEAT, {})
        (ev,) = pump(agent, home)
        assert isinstance(ev, p.EventReceived)
    assert len(home._seen) <= p.MAX_SEEN_IDS
    home.receive(first)  # forgotten, but still within the clock window
    (violation,) = home.events_received()
    assert violation.error.code is ErrorCode.REPLAY
    clock.now += 0.001
    agent.event(Op.HEARTBEAT, {})  # the honest peer goes on unharmed
    (ev,) = pump(agent, home)
    assert isinstance(ev, p.EventReceived)


def test_long_error_details_are_cut_before_sending():
    agent, home = connected()
    sent = home.request(Op.STATUS, {})
    (req,) = pump(home, agent)
    agent.fail(req.message, ErrorCode.INTERNAL, "x" * 100_000)
    (err,) = pump(agent, home)
    assert isinstance(err, p.ErrorReceived) and err.request.id == sent.id
    assert len(err.message.body["detail"]) == p.TEXT


def test_response_matched_to_request_by_id():
    agent, home = connected()
    sent = home.request(Op.STATUS, {})
    (req,) = pump(home, agent)
    agent.respond(req.message, {"ok": True})
    (resp,) = pump(agent, home)
    assert isinstance(resp, p.ResponseReceived)
    assert resp.request.id == sent.id == resp.message.re
    assert home.pending() == []


def test_response_to_unknown_request_gets_error():
    clock = FakeClock()
    agent, home = connected(clock)
    home.receive(p.encode(p.Message(id="r9", kind=Kind.RESPONSE, op=Op.STATUS, ts=clock.now,
                                    body={}, re="never-sent")))
    assert error_of(home)["code"] == "unknown_request"


def test_errors_never_get_error_replies():
    clock = FakeClock()
    agent, home = connected(clock)
    home.receive(p.encode(p.Message(id="e9", kind=Kind.ERROR, op=None, ts=clock.now,
                                    body={"code": "internal", "detail": "x"}, re="nothing")))
    assert home.data_to_send() == []
    (event,) = home.events_received()
    assert isinstance(event, p.ErrorReceived) and event.request is None


def test_request_in_wrong_direction_is_refused():
    clock = FakeClock()
    agent, home = connected(clock)
    home.receive(p.encode(p.Message(id="x1", kind=Kind.REQUEST, op=Op.SYNC, ts=clock.now,
                                    body={"directory": "d", "mode": "full"})))
    assert error_of(home)["code"] == "wrong_direction"
    with pytest.raises(ProtocolError):
        agent.request(Op.SYNC, {"directory": "d", "mode": "full"})


def test_stream_chunks_acks_and_window():
    agent, home = connected()
    home.request(Op.SYNC, {"directory": "ad", "mode": "full", "cursor": None})
    (req,) = pump(home, agent)
    for i in range(p.STREAM_WINDOW):
        agent.chunk(req.message, {"changes": [{"n": i}], "cursor": f"c{i}"})
    assert agent.stream_credit(req.message) == 0
    with pytest.raises(ProtocolError) as info:
        agent.chunk(req.message, {"changes": [], "cursor": "x"})
    assert info.value.code is ErrorCode.BUSY
    chunks = pump(agent, home)
    assert [c.message.seq for c in chunks] == list(range(p.STREAM_WINDOW))
    home.ack(chunks[3].message, {"cursor": "c3"})
    (ack,) = pump(home, agent)
    assert isinstance(ack, p.AckReceived) and ack.message.seq == 3
    assert agent.stream_credit(req.message) == 4
    agent.respond(req.message, {"cursor": "c7", "chunks": 8, "changes": 8})
    (final,) = pump(agent, home)
    assert isinstance(final, p.ResponseReceived) and final.message.body["cursor"] == "c7"


def test_out_of_order_chunk_is_refused():
    clock = FakeClock()
    agent, home = connected(clock)
    sent = home.request(Op.SEARCH, {"directory": "ad", "filter": "(uid=*)"})
    pump(home, agent)
    home.receive(p.encode(p.Message(id="c5", kind=Kind.CHUNK, op=Op.SEARCH, ts=clock.now,
                                    body={"entries": []}, re=sent.id, seq=5)))
    assert error_of(home)["code"] == "bad_sequence"


def test_ack_beyond_sent_chunks_is_refused():
    clock = FakeClock()
    agent, home = connected(clock)
    home.request(Op.SYNC, {"directory": "ad", "mode": "full"})
    (req,) = pump(home, agent)
    agent.chunk(req.message, {"changes": [], "cursor": "c0"})
    agent.data_to_send()
    agent.receive(p.encode(p.Message(id="a1", kind=Kind.ACK, op=Op.SYNC, ts=clock.now,
                                     body={}, re=req.message.id, seq=4)))
    (violation,) = agent.events_received()
    assert violation.error.code is ErrorCode.BAD_SEQUENCE


def test_fail_answers_open_request_with_code():
    agent, home = connected()
    agent.request(Op.RENEW, {"csr_pem": "bad"})
    (req,) = pump(agent, home)
    home.fail(req.message, ErrorCode.BAD_CSR, "not a CSR")
    (err,) = pump(home, agent)
    assert isinstance(err, p.ErrorReceived)
    assert err.code == "bad_csr" and err.request.op is Op.RENEW
    assert agent.pending() == []


def test_answering_twice_is_a_local_error():
    agent, home = connected()
    agent.request(Op.STATUS, {})
    (req,) = pump(agent, home)
    home.respond(req.message, {})
    with pytest.raises(ProtocolError) as info:
        home.respond(req.message, {})
    assert info.value.code is ErrorCode.UNKNOWN_REQUEST


def test_forgotten_request_answer_is_unknown():
    agent, home = connected()
    sent = home.request(Op.STATUS, {})
    (req,) = pump(home, agent)
    home.forget(sent.id)
    agent.respond(req.message, {})
    (violation,) = pump(agent, home)
    assert violation.error.code is ErrorCode.UNKNOWN_REQUEST


def test_violations_are_counted():
    home = Session(Role.HOME)
    for _ in range(3):
        home.receive("garbage")
    assert home.violations == 3
    assert len(home.data_to_send()) == 3


def test_cancel_reaches_the_serving_side_and_closes_the_request():
    agent, home = connected()
    sent = home.request(Op.SYNC, {"directory": "ad", "mode": "full"})
    (req,) = pump(home, agent)
    agent.chunk(req.message, {"changes": [], "cursor": "c0"})
    pump(agent, home)
    assert home.cancel(sent.id, "consumer went away").body["code"] == "cancelled"
    assert home.pending() == []
    (cancel,) = pump(home, agent)
    assert isinstance(cancel, p.CancelReceived) and cancel.request.id == req.message.id
    assert not agent.is_open(req.message)
    with pytest.raises(ProtocolError):
        agent.chunk(req.message, {"changes": [], "cursor": "c1"})
    assert home.cancel(sent.id) is None  # twice is a no-op


def test_cancelled_error_for_unknown_request_is_just_an_error():
    clock = FakeClock()
    agent, home = connected(clock)
    home.receive(p.encode(p.Message(id="x9", kind=Kind.ERROR, op=Op.STATUS, ts=clock.now,
                                    body={"code": "cancelled", "detail": "?"}, re="nothing")))
    (event,) = home.events_received()
    assert isinstance(event, p.ErrorReceived) and event.request is None


def test_encode_refuses_lone_surrogates():
    message = p.Message(id="a", kind=Kind.EVENT, op=Op.HEARTBEAT, ts=1.0, body={"x": "\udc80"})
    with pytest.raises(ProtocolError) as info:
        p.encode(message)
    assert info.value.code is ErrorCode.BAD_TYPE


def test_raw_json_is_spliced_verbatim_and_decodes_like_the_value():
    """The drain's fast path: pre-encoded spool bytes go into the frame unparsed."""
    inner = {"type": "chunk", "seq": 1, "changes": [{"op": "upsert", "id": "é\u2028", "n": [1, 2]}]}
    raw = json.dumps(inner, separators=(",", ":"), ensure_ascii=False).encode()
    body = {"directory": "d", "entries": [{"seq": 7, "message": p.RawJSON(raw)}], "after": 6,
            "note": "\x00 looks like a placeholder \x00"}
    msg = p.Message(id="m1", kind=Kind.REQUEST, op=Op.DIRECTORY_CHANGES, ts=1.0, body=body)
    text = p.encode(msg)
    assert raw.decode() in text
    back = p.decode(text).body
    assert back["entries"] == [{"seq": 7, "message": inner}] and back["note"] == body["note"]


def test_raw_json_counts_towards_the_frame_limit_and_refuses_empty():
    big = p.RawJSON('"' + "x" * p.MAX_FRAME_BYTES + '"')
    msg = p.Message(id="m2", kind=Kind.REQUEST, op=Op.DIRECTORY_CHANGES, ts=1.0,
                    body={"directory": "d", "entries": [{"seq": 1, "message": big}]})
    with pytest.raises(ProtocolError) as err:
        p.encode(msg)
    assert err.value.code is ErrorCode.TOO_LARGE
    with pytest.raises(ProtocolError):
        p.RawJSON(b"  ")
    with pytest.raises(ProtocolError):  # anything else still refuses to encode
        p.encode(p.Message(id="m3", kind=Kind.REQUEST, op=Op.DIRECTORY_CHANGES, ts=1.0,
                           body={"directory": "d", "entries": [object()]}))
