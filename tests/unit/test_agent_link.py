"""The agent's receive path (Link over protocol.Session) without sockets.

A scripted WebSocket stand-in feeds frames to :class:`Link.run`; the fuzz test
holds the agent to "any frame from home yields an error reply or an event,
never an exception out of the reader, never a dead link".
"""

import asyncio
import json
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from tether import protocol as p
from tether.agent.link import HandlerError, Link, RequestFailed


class ScriptedSocket:
    """Yields the given frames, records what the agent sends."""

    def __init__(self, frames):
        self.frames = list(frames)
        self.sent = []
        self.closed = False
        self.keep_open = False  # wait for frames appended later instead of ending

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(0)
        while not self.frames and self.keep_open:
            await asyncio.sleep(0.01)
        if not self.frames:
            raise StopAsyncIteration
        return self.frames.pop(0)

    async def send(self, text):
        self.sent.append(text)

    async def close(self, code=1000, reason=""):
        self.closed = True


def envelope(kind, op, body, re=None, seq=None, mid=None, ts=None):
    return json.dumps({"v": 1, "id": mid or p.new_id(), "kind": kind, "op": op,
                       "ts": ts if ts is not None else time.time(), "re": re,
                       "seq": seq, "body": body})


async def handler(link, message):
    if message.op is p.Op.STATUS:
        return {"ok": True}
    raise HandlerError(p.ErrorCode.UNAVAILABLE, "nothing here")


def established_link(frames):
    """A link whose hello was answered, then ``frames`` arrive."""
    ws = ScriptedSocket([])
    link = Link(ws, "wss://home/", 0, handler)

    async def go():
        hello = asyncio.ensure_future(link.request(p.Op.HELLO, {"agent_version": "t",
                                                                "image_id": "i"}))
        await asyncio.sleep(0)
        hello_id = json.loads(ws.sent[0])["id"]
        ws.frames = [envelope("response", "hello", {
            "home_version": "t", "server_time": time.time(), "role": "instance",
            "connector": "c"}, re=hello_id), *frames]
        reader = asyncio.ensure_future(link.run())
        await hello
        await reader
        await asyncio.sleep(0.01)
        return ws
    return link, go


def decoded(ws):
    return [json.loads(t) for t in ws.sent]


def test_request_from_home_is_served_and_errors_are_specific():
    link, go = established_link([
        envelope("request", "status", {}, mid="r1"),
        envelope("request", "sync", {"directory": "ad", "mode": "full"}, mid="r2"),
        "not json",
        envelope("request", "status", {}, mid="r1"),            # replay
        envelope("request", "hello", {"agent_version": "x", "image_id": "y"}),
        envelope("request", "status", {}, ts=time.time() - 3600),
        envelope("request", "frobnicate", {}),
    ])
    ws = asyncio.run(go())
    out = decoded(ws)[1:]  # after our hello
    answers = [(m["re"], m["kind"], m["body"].get("code")) for m in out if m["re"]]
    assert ("r1", "response", None) in answers and ("r1", "error", "replay") in answers
    assert ("r2", "error", "unavailable") in answers
    assert next(m for m in out if m["kind"] == "response")["body"] == {"ok": True}
    codes = [m["body"]["code"] for m in out if m["kind"] == "error"]
    for code in ("malformed", "replay", "wrong_direction", "stale", "unknown_op"):
        assert code in codes
    assert link.in_flight == 0 and link.served == 2


def test_error_answer_fails_our_request():
    ws = ScriptedSocket([])
    link = Link(ws, "wss://home/", 0, handler)

    async def go():
        hello = asyncio.ensure_future(link.request(p.Op.HELLO, {"agent_version": "t",
                                                                "image_id": "i"}))
        await asyncio.sleep(0)
        hid = json.loads(ws.sent[0])["id"]
        ws.frames = [envelope("error", "hello", {"code": "unauthorized",
                                                 "detail": "revoked"}, re=hid)]
        await link.run()
        try:
            await hello
        except RequestFailed as exc:
            return exc
    exc = asyncio.run(go())
    assert exc.code == "unauthorized" and "revoked" in exc.detail


def test_close_fails_waiting_requests():
    ws = ScriptedSocket([])
    link = Link(ws, "wss://home/", 0, handler)

    async def go():
        hello = asyncio.ensure_future(link.request(p.Op.HELLO, {"agent_version": "t",
                                                                "image_id": "i"}))
        await asyncio.sleep(0)
        await link.run()  # no frames: socket closes
        try:
            await hello
        except ConnectionError as exc:
            return exc
    assert "closed" in str(asyncio.run(go()))


frames = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=300),
    st.builds(lambda kind, op, body, re, seq, ts: envelope(kind, op, body, re, seq, ts=ts),
              st.sampled_from([k.value for k in p.Kind] + ["bogus"]),
              st.sampled_from([o.value for o in p.Op] + ["nope", ""]),
              st.dictionaries(st.text(max_size=10),
                              st.one_of(st.none(), st.integers(), st.text(max_size=20),
                                        st.booleans(), st.lists(st.integers(), max_size=3)),
                              max_size=4),
              st.one_of(st.none(), st.text(max_size=8)),
              st.one_of(st.none(), st.integers(min_value=-2, max_value=5)),
              st.one_of(st.just(time.time()), st.floats(allow_nan=True))),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(frames, max_size=8))
def test_fuzz_agent_receive_path_never_raises(batch):
    link, go = established_link(batch)
    ws = asyncio.run(go())
    for text in ws.sent:  # everything the agent says back is itself valid protocol
        p.decode(text)
    assert link.in_flight == 0


def test_cancel_from_home_stops_the_handler_and_sends_nothing():
    started, finished = [], []

    async def slow(link, message):
        started.append(message.id)
        await asyncio.sleep(5)
        finished.append(message.id)
        return {}

    ws = ScriptedSocket([])
    ws.keep_open = True
    link = Link(ws, "wss://home/", 0, slow)

    async def go():
        hello = asyncio.ensure_future(link.request(p.Op.HELLO, {"agent_version": "t",
                                                                "image_id": "i"}))
        await asyncio.sleep(0)
        hid = json.loads(ws.sent[0])["id"]
        ws.frames = [envelope("response", "hello", {
            "home_version": "t", "server_time": time.time(), "role": "instance",
            "connector": "c"}, re=hid),
            envelope("request", "status", {}, mid="slow1")]
        reader = asyncio.ensure_future(link.run())
        await hello
        while not started:
            await asyncio.sleep(0.01)
        ws.frames.append(envelope("error", "status", {"code": "cancelled",
                                                      "detail": "home gave up"}, re="slow1"))
        while link.in_flight:
            await asyncio.sleep(0.01)
        assert not reader.done()  # cancelled while the socket stayed open
        ws.keep_open = False
        await reader
    asyncio.run(go())
    assert started == ["slow1"] and finished == []
    assert link.in_flight == 0
    assert not [m for m in decoded(ws) if m.get("re") == "slow1"]
