"""Property-based fuzzing of the tether wire decoder (hypothesis).

Whatever the peer sends, decoding gives a valid Message or a ProtocolError, and
a Session never raises from receive(); valid messages survive a round trip.
"""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings, strategies as st

from tether import protocol as p

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) \
    | st.text(max_size=20)
json_values = st.recursive(json_scalars,
                           lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=20)
ids = st.from_regex(r"\A[A-Za-z0-9_.:-]{1,64}\Z")


def _decode_or_protocol_error(data):
    try:
        message = p.decode(data)
    except p.ProtocolError as exc:
        assert isinstance(exc.code, p.ErrorCode)
        return None
    assert isinstance(message, p.Message)
    return message


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_any_bytes_decode_or_protocol_error(data):
    _decode_or_protocol_error(data)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=512))
def test_any_text_decode_or_protocol_error(data):
    _decode_or_protocol_error(data)


envelopes = st.fixed_dictionaries(
    {
        "v": st.sampled_from([1, 1, 1, 2, "1", None]),
        "id": ids | json_values,
        "kind": st.sampled_from([k.value for k in p.Kind]) | json_values,
        "op": st.sampled_from([o.value for o in p.Op]) | json_values,
        "ts": st.floats(allow_nan=False) | json_values,
        "body": st.dictionaries(st.text(max_size=12), json_values, max_size=5) | json_values,
    },
    optional={"re": ids | json_values, "seq": st.integers(-2, 10) | json_values,
              "junk": json_values},
)


@settings(max_examples=300, deadline=None)
@given(envelopes)
def test_structured_garbage_decode_or_protocol_error(obj):
    message = _decode_or_protocol_error(json.dumps(obj))
    if message is not None:
        assert p.decode(p.encode(message)) == message


def _body_for(op, kind):
    spec = {name: f for name, f in p.BODY_FIELDS.get((op, kind), {}).items() if name != "*"}
    samples = {str: st.text(max_size=10), int: st.integers(0, 10**6),
               float: st.floats(0, 1e9), bool: st.booleans(), dict: st.just({"a": 1}),
               list: st.just([1, "x"]), None: st.none()}
    return st.fixed_dictionaries({name: st.one_of(*[samples[t] for t in f.types])
                                  for name, f in spec.items() if f.required},
                                 optional={name: st.one_of(*[samples[t] for t in f.types])
                                           for name, f in spec.items() if not f.required})


@st.composite
def valid_messages(draw):
    kind = draw(st.sampled_from([k for k in p.Kind if k is not p.Kind.ERROR]))
    ops = [o for o in p.Op if o in p.STREAM_OPS] if kind in (p.Kind.CHUNK, p.Kind.ACK) \
        else list(p.Op)
    op = draw(st.sampled_from(ops))
    if kind is p.Kind.ACK:
        body = {}
    else:
        body = draw(_body_for(op, kind))
    re = draw(ids) if kind in (p.Kind.RESPONSE, p.Kind.CHUNK, p.Kind.ACK) else None
    seq = draw(st.integers(0, 10**6)) if kind in (p.Kind.CHUNK, p.Kind.ACK) else None
    return p.Message(id=draw(ids), kind=kind, op=op, ts=draw(st.floats(0, 4e9)), body=body,
                     re=re, seq=seq)


@settings(max_examples=400, deadline=None)
@given(valid_messages())
def test_round_trip(message):
    assert p.decode(p.encode(message)) == message


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=200) | st.builds(json.dumps, envelopes), max_size=8))
def test_session_receive_never_raises(frames):
    for role in p.Role:
        session = p.Session(role)
        for frame in frames:
            session.receive(frame)
        for text in session.data_to_send():
            assert p.decode(text).kind is p.Kind.ERROR


def _established_pair():
    agent, home = p.Session(p.Role.AGENT), p.Session(p.Role.HOME)
    agent.request(p.Op.HELLO, {"agent_version": "t", "image_id": "i"})
    for text in agent.data_to_send():
        home.receive(text)
    (hello,) = home.events_received()
    home.respond(hello.message, {"home_version": "t", "server_time": 0.0, "role": "instance",
                                 "connector": "c"})
    for text in home.data_to_send():
        agent.receive(text)
    agent.events_received()
    return agent, home


fresh_frames = st.builds(
    lambda kind, op, body, re, seq: json.dumps({
        "v": 1, "id": p.new_id(), "kind": kind, "op": op, "ts": time.time(),
        "re": re, "seq": seq, "body": body}),
    st.sampled_from([k.value for k in p.Kind]), st.sampled_from([o.value for o in p.Op]),
    st.dictionaries(st.text(max_size=12), json_values, max_size=5),
    st.none() | ids, st.none() | st.integers(-1, 20))


@settings(max_examples=150, deadline=None)
@given(st.lists(fresh_frames | st.binary(max_size=100), max_size=10))
def test_established_sessions_survive_any_frames(frames):
    """After hello, fresh-timestamped frames of every kind/op mix: no exception,
    and everything a session sends back is an error message."""
    for session in _established_pair():
        for frame in frames:
            session.receive(frame)
        for text in session.data_to_send():
            assert p.decode(text).kind is p.Kind.ERROR
        session.events_received()


# ------------------------------------------------ the decoder contract (issue 11)
#
# Whatever arrives, decode() returns a Message or raises ProtocolError; and a Message
# that got through is bounded: every integer signed 64-bit, every float finite, every
# string valid Unicode (encodable as UTF-8), every named field within its limit, so
# the handlers, the log and the database never see what the wire may not carry.

hostile_scalars = (st.none() | st.booleans() | st.integers()
                   | st.integers(min_value=2**63 - 2, max_value=2**70)
                   | st.integers(min_value=-(2**70), max_value=-(2**63) + 2)
                   | st.floats(allow_nan=False)
                   | st.text(st.characters(codec="utf-8") | st.characters(categories=["Cs"]),
                             max_size=12)
                   | st.integers(0, 3000).map(lambda n: "x" * n))
hostile_values = st.recursive(hostile_scalars,
                              lambda inner: st.lists(inner, max_size=4)
                              | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                              max_leaves=12)
#: Number spellings json.dumps never writes but a peer may.
number_texts = st.sampled_from(["1" + "0" * 400, "-1" + "0" * 400, "1e400", "-1e400", "1E999",
                                "9223372036854775808", "-9223372036854775809",
                                "9223372036854775807", "1" + "0" * 5000, "0." + "0" * 400 + "1",
                                "1.5e308", "2e308", "123456789012345678901234567890.5"])


@st.composite
def hostile_frames(draw):
    """An envelope that is often nearly valid (fresh ts, known op and kind, fields of
    the right names) with hostile values, numbers spelled by hand and surrogate escapes."""
    kind = draw(st.sampled_from([k.value for k in p.Kind]))
    op = draw(st.sampled_from([o.value for o in p.Op]))
    spec = p.BODY_FIELDS.get((p.Op(op), p.Kind(kind)), {})
    names = [n for n in spec if n != "*"] or ["detail", "code"]
    body = draw(st.dictionaries(st.sampled_from(names) | st.text(max_size=6), hostile_values,
                                max_size=6))
    doc = {"v": 1, "id": draw(ids), "kind": kind, "op": op, "ts": time.time(),
           "re": draw(st.none() | ids), "seq": draw(st.none() | st.integers(0, 5)),
           "body": body}
    text = json.dumps(doc)  # ensure_ascii: lone surrogates become \udXXX escapes
    number = draw(number_texts)
    where = draw(st.sampled_from(["ts", "seq", "body", "none"]))
    if where == "ts":
        text = text.replace(f'"ts": {doc["ts"]!r}', f'"ts": {number}')
    elif where == "seq":
        text = text.replace('"seq": ', f'"seq": {number}, "x": ', 1)
    elif where == "body":
        text = text.replace('"body": {', f'"body": {{"config_version": {number}, ', 1)
    return text


def _bounded(value, depth=0):
    if isinstance(value, bool) or value is None:
        return True
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    if isinstance(value, float):
        return value == value and abs(value) != float("inf")
    if isinstance(value, str):
        value.encode("utf-8")  # raises on a lone surrogate
        return True
    if isinstance(value, list):
        return all(_bounded(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(_bounded(k) and _bounded(v, depth + 1) for k, v in value.items())
    return False


def _within_limits(message):
    spec = p.BODY_FIELDS.get((message.op, message.kind), {})
    for name, value in message.body.items():
        limit = spec[name].limit if name in spec else \
            (spec["*"].limit if "*" in spec else p.DEFAULT_LIMIT)
        if message.kind is p.Kind.ERROR:
            limit = {"code": 64, "detail": p.TEXT}.get(name, p.DEFAULT_LIMIT)
        if limit is None:
            continue
        size = len(value) if isinstance(value, str) else \
            len(json.dumps(value, separators=(",", ":"))) if isinstance(value, (list, dict)) \
            else 0
        assert size <= limit, (name, size, limit)


@settings(max_examples=500, deadline=None)
@given(hostile_frames())
def test_decoder_contract_only_protocol_errors_and_bounded_messages(text):
    for data in (text, text.encode("utf-8")):
        message = _decode_or_protocol_error(data)
        if message is None:
            continue
        assert _bounded(message.to_dict())
        _within_limits(message)
        assert p.decode(p.encode(message)) == message  # what we accept we can also send


@settings(max_examples=150, deadline=None)
@given(st.lists(hostile_frames(), max_size=8))
def test_sessions_survive_hostile_frames_on_both_sides(frames):
    """Established agent and home sessions: hostile frames are violations with an
    error reply at most, never an exception."""
    for session in _established_pair():
        for frame in frames:
            session.receive(frame)
        for text in session.data_to_send():
            assert p.decode(text).kind is p.Kind.ERROR
        for ev in session.events_received():
            if hasattr(ev, "message"):
                assert _bounded(ev.message.to_dict())


def test_the_numbers_of_issue_11_are_protocol_errors():
    """The reported inputs: ts 1 followed by 400 zeros (OverflowError before), an
    integer >= 2**63 and a lone surrogate in hello and config.ack bodies."""
    base = {"v": 1, "id": "a1", "kind": "event", "op": "config.ack", "ts": time.time(),
            "re": None, "seq": None, "body": {"version": 1, "status": "applied"}}
    ts_text = json.dumps(base).replace(f'"ts": {base["ts"]!r}', '"ts": 1' + "0" * 400)
    big = json.dumps(base).replace('"version": 1', '"version": 9223372036854775808')
    lone = json.dumps({**base, "body": {"version": 1, "status": "\ud800"}})
    hello = json.dumps({**base, "kind": "request", "op": "hello",
                        "body": {"agent_version": "\udfff", "image_id": "i"}})
    for text in (ts_text, big, lone, hello):
        with pytest.raises(p.ProtocolError) as info:
            p.decode(text)
        assert info.value.code is p.ErrorCode.MALFORMED
        session = p.Session(p.Role.HOME)
        session.receive(text)
        (violation,) = session.events_received()
        assert isinstance(violation, p.ProtocolViolation)


@pytest.mark.parametrize("op,kind,field,size", [
    ("error", "error", "detail", p.TEXT + 1),
    ("config.ack", "event", "detail", p.TEXT + 1),
    ("config.ack", "event", "status", p.SHORT + 1),
    ("hello", "request", "agent_version", p.SHORT + 1),
    ("heartbeat", "event", "unknown_extra", p.DEFAULT_LIMIT + 1),
])
def test_oversized_fields_are_refused_at_decode(op, kind, field, size):
    body = {"error": {"code": "internal", "detail": "x"},
            "config.ack": {"version": 1, "status": "applied"},
            "hello": {"agent_version": "1", "image_id": "i"},
            "heartbeat": {}}[op]
    body = {**body, field: "x" * size}
    text = json.dumps({"v": 1, "id": "a1", "kind": kind, "op": None if op == "error" else op,
                       "ts": time.time(), "re": None, "seq": None, "body": body})
    with pytest.raises(p.ProtocolError) as info:
        p.decode(text)
    assert info.value.code is p.ErrorCode.BAD_TYPE
    assert field in info.value.detail and info.value.extra["limit"] == size - 1
    body[field] = "x" * (size - 1)
    text = json.dumps({"v": 1, "id": "a1", "kind": kind, "op": None if op == "error" else op,
                       "ts": time.time(), "re": None, "seq": None, "body": body})
    assert p.decode(text).body[field] == "x" * (size - 1)
