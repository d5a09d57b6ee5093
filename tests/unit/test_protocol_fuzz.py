"""Property-based fuzzing of the tether wire decoder (hypothesis).

Whatever the peer sends, decoding gives a valid Message or a ProtocolError, and
a Session never raises from receive(); valid messages survive a round trip.
"""

from __future__ import annotations

import json
import time

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
    spec = p.BODY_FIELDS.get((op, kind), {})
    samples = {str: st.text(max_size=10), int: st.integers(0, 10**6),
               float: st.floats(0, 1e9), bool: st.booleans(), dict: st.just({"a": 1}),
               list: st.just([1, "x"]), None: st.none()}
    return st.fixed_dictionaries({name: st.one_of(*[samples[t] for t in types])
                                  for name, (types, required) in spec.items() if required},
                                 optional={name: st.one_of(*[samples[t] for t in types])
                                           for name, (types, required) in spec.items()
                                           if not required})


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
