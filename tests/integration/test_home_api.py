"""The in-process API (Hub.request / Hub.stream) against a real TLS socket.

The server runs in the test's own event loop (HomeServer), the agent side is a
RawAgent answering like a directory-serving agent would: a plain request, a
streamed sync with acks, an error reply, and an agent that vanishes.
"""

from __future__ import annotations

import asyncio

import pytest

from homeproc import HomeProcess, RawAgent, client_context, enroll, running
from tether import protocol as p
from tether.home.errors import AgentUnavailable, RequestFailed

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def prepared(tmp_path):
    """A state dir with an enrolled instance, server stopped again."""
    home = HomeProcess.start(tmp_path, connector="dir", max_instances=2)
    try:
        bundle = home.issue_image()
        instance = asyncio.run(enroll(home, bundle, tmp_path, "vm-1"))
    finally:
        home.stop()
    return home, bundle, instance


async def serve_agent(agent: RawAgent, replies: int) -> list:
    """Answer home's requests: status → response, sync → 3 chunks + final."""
    seen = []
    while len(seen) < replies:
        for ev in await agent.next_events():
            if isinstance(ev, p.AckReceived):
                seen.append(("ack", ev.message.seq))
                continue
            if not isinstance(ev, p.RequestReceived):
                continue
            msg = ev.message
            seen.append(msg.op.value)
            if msg.op is p.Op.STATUS:
                agent.session.respond(msg, {"healthy": True})
            elif msg.op is p.Op.SYNC:
                for i in range(3):
                    agent.session.chunk(msg, {"changes": [{"n": i}], "cursor": f"c{i}"})
                agent.session.respond(msg, {"cursor": "c2", "chunks": 3, "changes": 3})
            elif msg.op is p.Op.AUTHENTICATE:
                agent.session.fail(msg, p.ErrorCode.UNAVAILABLE, "directory down")
            await agent.flush()
    return seen


def test_request_stream_and_errors(prepared, tmp_path):
    home, bundle, (instance_id, cert_pem, key_pem, _) = prepared

    async def go():
        async with running(home.state) as (server, url):
            with pytest.raises(AgentUnavailable):
                await server.hub.request("dir", p.Op.STATUS, {})
            agent = await RawAgent.connect(url, client_context(bundle["ca_pem"], cert_pem,
                                                               key_pem, tmp_path))
            await agent.hello(bundle["image_id"], instance_id, config_version=None)
            helper = asyncio.create_task(serve_agent(agent, 3 + 3))
            status = await server.hub.request("dir", p.Op.STATUS, {})
            items = [m async for m in server.hub.stream(
                "dir", p.Op.SYNC, {"directory": "ad", "mode": "full", "cursor": None})]
            with pytest.raises(RequestFailed) as failed:
                await server.hub.request("dir", p.Op.AUTHENTICATE,
                                         {"directory": "ad", "username": "u", "password": "x"})
            seen = await asyncio.wait_for(helper, 10)
            await agent.close()
            return status, items, failed.value, seen
    status, items, failed, seen = asyncio.run(go())
    assert status.body == {"healthy": True}
    assert [m.kind for m in items] == [p.Kind.CHUNK] * 3 + [p.Kind.RESPONSE]
    assert [m.body.get("cursor") for m in items] == ["c0", "c1", "c2", "c2"]
    assert failed.code is p.ErrorCode.UNAVAILABLE and "directory down" in failed.detail
    assert ("ack", 0) in seen and ("ack", 2) in seen


def test_agent_vanishing_fails_pending_request(prepared, tmp_path):
    home, bundle, (instance_id, cert_pem, key_pem, _) = prepared

    async def go():
        async with running(home.state) as (server, url):
            agent = await RawAgent.connect(url, client_context(bundle["ca_pem"], cert_pem,
                                                               key_pem, tmp_path))
            await agent.hello(bundle["image_id"], instance_id, config_version=None)
            pending = asyncio.create_task(server.hub.request("dir", p.Op.STATUS, {}, timeout=20))
            await agent.next_events()  # the request arrived; now drop the socket unanswered
            agent.ws.transport.abort()
            with pytest.raises(AgentUnavailable):
                await pending
            return server.hub.live()
    live = asyncio.run(go())
    assert live["sockets"] == 0


def test_consumer_leaving_a_stream_cancels_it_at_the_agent(prepared, tmp_path):
    home, bundle, (instance_id, cert_pem, key_pem, _) = prepared

    async def agent_side(agent: RawAgent):
        while True:
            for ev in await agent.next_events():
                if isinstance(ev, p.RequestReceived):
                    for i in range(p.STREAM_WINDOW):
                        agent.session.chunk(ev.message, {"changes": [i], "cursor": f"c{i}"})
                    await agent.flush()
                elif isinstance(ev, p.CancelReceived):
                    return ev

    async def go():
        async with running(home.state) as (server, url):
            agent = await RawAgent.connect(url, client_context(bundle["ca_pem"], cert_pem,
                                                               key_pem, tmp_path))
            await agent.hello(bundle["image_id"], instance_id, config_version=None)
            watcher = asyncio.create_task(agent_side(agent))
            stream = server.hub.stream("dir", p.Op.SYNC, {"directory": "ad", "mode": "full"})
            first = await stream.__anext__()
            await stream.aclose()
            cancel = await asyncio.wait_for(watcher, 10)
            await agent.close()
            return first, cancel
    first, cancel = asyncio.run(go())
    assert first.body["cursor"] == "c0"
    assert cancel.message.body["code"] == "cancelled" and cancel.request.op is p.Op.SYNC


def test_failover_to_another_instance_and_cluster_routing(prepared, tmp_path):
    home, bundle, (iid_a, cert_a, key_a, _) = prepared
    home.serve()
    try:
        iid_b, cert_b, key_b, _ = asyncio.run(enroll(home, bundle, tmp_path, "vm-2"))
    finally:
        home.stop()

    async def answer(agent: RawAgent, healthy: bool, served: list):
        while True:
            for ev in await agent.next_events():
                if isinstance(ev, p.RequestReceived):
                    served.append(healthy)
                    if healthy:
                        agent.session.respond(ev.message, {"ok": True, "dn": "uid=u"})
                    else:
                        agent.session.fail(ev.message, p.ErrorCode.UNAVAILABLE, "no DC reachable")
                    await agent.flush()

    async def go():
        async with running(home.state) as (server, url):
            agents, tasks, served = [], [], []
            for iid, cert, key, healthy in ((iid_a, cert_a, key_a, False),
                                            (iid_b, cert_b, key_b, True)):
                agent = await RawAgent.connect(url, client_context(bundle["ca_pem"], cert, key,
                                                                   tmp_path))
                await agent.hello(bundle["image_id"], iid, config_version=None)
                agents.append(agent)
                tasks.append(asyncio.create_task(answer(agent, healthy, served)))
            body = {"directory": "ad", "username": "u", "password": "pw"}
            results = [await server.hub.request("dir", p.Op.AUTHENTICATE, body) for _ in range(4)]
            by_cluster = await server.hub.request(None, p.Op.AUTHENTICATE, body, cluster="dir")
            with pytest.raises(RequestFailed):  # provisioning never fails over
                for _ in range(2):
                    await server.hub.request("dir", p.Op.PROVISION,
                                             {"directory": "ad", "order": {"id": "o1", "op": "create_user"}})
            for task in tasks:
                task.cancel()
            for agent in agents:
                await agent.close()
            return results, by_cluster, served
    results, by_cluster, served = asyncio.run(go())
    assert all(r.body["ok"] for r in results) and by_cluster.body["ok"]
    assert False in served  # the broken instance was tried, and skipped


def test_draining_socket_gets_no_new_requests(prepared, tmp_path):
    home, bundle, (instance_id, cert_pem, key_pem, _) = prepared

    async def answer(agent: RawAgent, name: str, served: list):
        while True:
            for ev in await agent.next_events():
                if isinstance(ev, p.RequestReceived):
                    served.append(name)
                    agent.session.respond(ev.message, {"socket": name})
                    await agent.flush()

    async def go():
        async with running(home.state) as (server, url):
            ctx = client_context(bundle["ca_pem"], cert_pem, key_pem, tmp_path)
            old, new = (await RawAgent.connect(url, ctx), await RawAgent.connect(url, ctx))
            served: list = []
            for index, agent in enumerate((old, new)):
                await agent.hello(bundle["image_id"], instance_id, config_version=None,
                                  socket_index=index)
            tasks = [asyncio.create_task(answer(old, "old", served)),
                     asyncio.create_task(answer(new, "new", served))]
            old.session.event(p.Op.HEARTBEAT, {"uptime": 1.0, "draining": True})
            await old.flush()
            while not any(pe.draining for pe in server.hub.agents("dir")):
                await asyncio.sleep(0.02)
            for _ in range(6):
                await server.hub.request("dir", p.Op.STATUS, {})
            for task in tasks:
                task.cancel()
            await old.close()
            await new.close()
            return served
    assert asyncio.run(go()) == ["new"] * 6
