"""The protocol's asyncio Connection, both ends in memory: requests, cancellation on
timeout (rule 5), streams with the ack window, refusals with extra fields."""

import asyncio

import pytest

from tether import protocol as p


class Pipe:
    """One direction of an in-memory socket pair."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.other: "Pipe | None" = None
        self.sent: list[str] = []

    def __aiter__(self):
        return self

    async def __anext__(self) -> str:
        text = await self.inbox.get()
        if text is None:
            raise StopAsyncIteration
        return text

    async def send(self, text: str) -> None:
        self.sent.append(text)
        self.other.inbox.put_nowait(text)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.inbox.put_nowait(None)


class Served(p.Connection):
    def __init__(self, ws, role, handler=None):
        super().__init__(ws, p.Session(role), name=role.value)
        self.handler = handler
        self.events = []

    async def handle_request(self, message):
        return await self.handler(self, message)

    def on_event(self, event):
        self.events.append(event)


async def pair(agent_handler=None, home_handler=None):
    """An agent and a home Connection joined in memory, hello done, readers running."""
    a, h = Pipe(), Pipe()
    a.other, h.other = h, a

    async def hello(conn, message):
        if message.op is p.Op.HELLO:
            return {"home_version": "t", "server_time": 0, "role": "instance", "connector": "c"}
        return await home_handler(conn, message)

    agent, home = Served(a, p.Role.AGENT, agent_handler), Served(h, p.Role.HOME, hello)
    readers = [asyncio.ensure_future(agent.run()), asyncio.ensure_future(home.run())]
    await agent.request(p.Op.HELLO, {"agent_version": "t", "image_id": "i"})
    return agent, home, readers


def test_timed_out_request_is_cancelled_at_the_peer():
    started, stopped = asyncio.Event(), []

    async def slow(conn, message):
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            stopped.append(message.id)
            raise
        return {}

    async def go():
        agent, home, readers = await pair(agent_handler=slow)
        with pytest.raises(TimeoutError):
            await home.request(p.Op.STATUS, {}, timeout=0.2)
        for _ in range(100):
            if stopped:
                break
            await asyncio.sleep(0.01)
        assert any(isinstance(e, p.CancelReceived) for e in agent.events)
        assert agent.in_flight == 0
        return stopped
    assert len(asyncio.run(go())) == 1


def test_refusal_carries_code_detail_and_extra_fields():
    async def refuse(conn, message):
        raise p.HandlerError(p.ErrorCode.UNAVAILABLE, "try later", limit=3)

    async def go():
        agent, home, readers = await pair(agent_handler=refuse)
        with pytest.raises(p.RequestFailed) as failed:
            await home.request(p.Op.STATUS, {})
        return failed.value
    exc = asyncio.run(go())
    assert exc.code is p.ErrorCode.UNAVAILABLE and exc.detail == "try later"
    assert exc.extra == {"limit": 3} and exc.body["limit"] == 3
    assert isinstance(exc, p.HandlerError)


def test_stream_waits_for_acks_and_ends_with_the_response():
    """More chunks than the window: the sender waits on acks, the reader acks as it goes."""
    count = p.STREAM_WINDOW * 3

    async def search(conn, message):
        for n in range(count):
            await conn.send_chunk(message, {"entries": [n]}, timeout=5)
            assert conn.session.stream_credit(message) >= 0
        return {"entries": count, "truncated": False}

    async def go():
        agent, home, readers = await pair(agent_handler=search)
        got = []
        async for message in home.stream(p.Op.SEARCH, {"directory": "d", "kind": "user", "filter": ""}):
            got.append(message)
            await asyncio.sleep(0)
        return got
    got = asyncio.run(go())
    assert [m.body["entries"] for m in got[:-1]] == [[n] for n in range(count)]
    assert got[-1].kind is p.Kind.RESPONSE and got[-1].body["entries"] == count


def test_send_chunk_gives_up_when_nothing_is_acknowledged():
    async def search(conn, message):
        for n in range(p.STREAM_WINDOW + 1):
            await conn.send_chunk(message, {"entries": [n]}, timeout=0.2)
        return {}

    async def go():
        agent, home, readers = await pair(agent_handler=search)
        sent = home.session.request(p.Op.SEARCH, {"directory": "d", "kind": "user", "filter": ""})
        await home.flush()  # nobody reads the stream: no acks
        for _ in range(200):
            if agent.served:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        return home.events, sent, agent
    events, sent, agent = asyncio.run(go())
    assert agent.served == 1 and agent.in_flight == 0
    [refusal] = [e for e in events if isinstance(e, p.ErrorReceived)]
    assert refusal.message.re == sent.id and refusal.code == "timeout"
