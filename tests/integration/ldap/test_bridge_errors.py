"""Follower failures reach home through the spool (issue 5, "Bad input and faults").

A directory whose bind password is wrong, or whose server stops, spools one
`error` stream message that the drain delivers like the data; a second, good
directory keeps syncing meanwhile. Driven through the real Bridge over real
protocol Sessions (test_bridge.py's FakeAgent / FakeLink / FakeHome).
"""

from __future__ import annotations

import asyncio

import pytest

from ldapfix_helpers import slapd_config
from test_bridge import FakeAgent, run, set_mail, until
from tether import protocol as p
from tether.agent.directory.bridge import Bridge
from tether.agent.directory.managed import BridgeFollower


@pytest.fixture
def attempts(monkeypatch):
    """Sync attempts per directory id, so a test can wait for a retry without a clock."""
    counts: dict[str, int] = {}
    original = BridgeFollower._attempt

    def counted(self):
        try:
            return original(self)
        finally:
            counts[self.ident] = counts.get(self.ident, 0) + 1
    monkeypatch.setattr(BridgeFollower, "_attempt", counted)
    return counts


def messages(agent: FakeAgent, directory: str, kind: str) -> list[dict]:
    return [m for _, m in agent.home.applied.get(directory, []) if m["type"] == kind]


def full_ended(agent: FakeAgent, directory: str) -> bool:
    return any(m["mode"] == "full" for m in messages(agent, directory, "end"))


async def follow(link, bridge: Bridge, directory: str) -> p.Message:
    reply = await link.call(bridge, p.Op.SYNC, {"directory": directory, "mode": "follow",
                                               "cursor": None})
    assert reply.kind is p.Kind.RESPONSE, reply.body
    return reply


async def retry(bridge: Bridge, attempts: dict, directory: str) -> None:
    """Wake `directory`'s follower and wait until it tried once more."""
    before = attempts.get(directory, 0)
    bridge.directories[directory].follower._wake.set()
    await until(lambda: attempts.get(directory, 0) > before, f"{directory} retried")


async def reported(agent: FakeAgent, bridge: Bridge, attempts: dict, directory: str,
                   code: str) -> dict:
    """The first `error` message home got for `directory` with `code`, retrying meanwhile."""
    def found():
        return next((m for m in messages(agent, directory, "error") if m["code"] == code), None)
    deadline = 20
    while found() is None and deadline:
        assert all(m["code"] == code for m in messages(agent, directory, "error"))
        await retry(bridge, attempts, directory)
        await drained(bridge, directory)
        deadline -= 1
    assert found(), messages(agent, directory, "error")
    return found()


async def drained(bridge: Bridge, directory: str) -> None:
    spool = bridge.directories[directory].spool
    await until(lambda: len(spool) == 0, f"{directory} spool acknowledged")


def test_wrong_bind_password_is_reported_and_good_directory_syncs(
        ldap_raw, ldap_admin, tmp_path, attempts):
    async def scenario():
        agent = FakeAgent(tmp_path)
        link = agent.connect()
        bridge = Bridge(agent.state, agent.sockets)
        bridge.configure({"directories": [{**ldap_raw, "id": "bad", "bind_password": "wrong"},
                                          {**ldap_raw, "id": "good"}]})
        try:
            await follow(link, bridge, "bad")
            await follow(link, bridge, "good")
            await until(lambda: messages(agent, "bad", "error"), "bad's error drained home")
            await until(lambda: full_ended(agent, "good"), "good's full sync drained home")
            error = await reported(agent, bridge, attempts, "bad", "bind_failed")
            assert error["directory"] == "bad" and "invalid credentials" in error["message"]
            assert "bind DN and password" in error["hint"]
            assert isinstance(error["at"], float) and error["server"]
            assert not messages(agent, "bad", "end")
            status = (await link.call(bridge, p.Op.SYNC, {"directory": "bad", "mode": "follow"})).body
            assert status["error"]["code"] == "bind_failed"

            set_mail(ldap_admin, "u002", "changed-while-bad-fails@example.org")
            await until(lambda: any(r.get("attributes", {}).get("email")
                                    == "changed-while-bad-fails@example.org"
                                    for m in messages(agent, "good", "chunk")
                                    for r in m["changes"]), "good keeps syncing")
            assert not messages(agent, "good", "error")
        finally:
            await bridge.close()
    run(scenario())


def test_server_down_then_back_reports_then_ends_again(ldap_raw, slapd_factory, test_ca,
                                                        tmp_path, attempts):
    flaky = slapd_factory("flaky")

    async def scenario():
        agent = FakeAgent(tmp_path / "agent")
        link = agent.connect()
        bridge = Bridge(agent.state, agent.sockets)
        bridge.configure({"directories": [{**slapd_config(flaky, test_ca), "id": "flaky"},
                                          {**ldap_raw, "id": "good"}]})
        try:
            await follow(link, bridge, "flaky")
            await follow(link, bridge, "good")
            await until(lambda: full_ended(agent, "flaky") and full_ended(agent, "good"),
                        "both full syncs drained home")

            await asyncio.to_thread(flaky.stop)
            await retry(bridge, attempts, "flaky")
            await until(lambda: messages(agent, "flaky", "error"), "server_down drained home")
            error = await reported(agent, bridge, attempts, "flaky", "server_down")
            assert "running and reachable" in error["hint"]

            await retry(bridge, attempts, "good")  # the other directory is not disturbed
            await drained(bridge, "good")
            assert not messages(agent, "good", "error")

            await asyncio.to_thread(flaky.start)
            ends = len(messages(agent, "flaky", "end"))
            await retry(bridge, attempts, "flaky")
            await until(lambda: len(messages(agent, "flaky", "end")) > ends,
                        "flaky syncs again once its server is back")
            applied = [m["type"] for _, m in agent.home.applied["flaky"]]
            assert applied.index("error") < len(applied) - 1 - applied[::-1].index("end")
            assert bridge.directories["flaky"].follower.reported is None
        finally:
            await bridge.close()
    run(scenario())


def test_leader_reconfigured_with_a_refused_config_tells_home(ldap_raw, tmp_path):
    """Home re-sends `sync follow` only on a leader change: the refusal must come by the spool."""
    async def scenario():
        agent = FakeAgent(tmp_path)
        link = agent.connect()
        bridge = Bridge(agent.state, agent.sockets)
        bridge.configure({"directories": [{**ldap_raw, "id": "corp"}]})
        try:
            await follow(link, bridge, "corp")
            await until(lambda: full_ended(agent, "corp"), "full sync drained home")
            bridge.configure({"directories": [{**ldap_raw, "id": "corp", "user_filter": "(uid="}]})
            await until(lambda: messages(agent, "corp", "error"), "the refusal drained home")
            error = messages(agent, "corp", "error")[0]
            assert error["code"] == "bad_filter" and "user_filter" in error["message"]
            refused = await link.call(bridge, p.Op.SYNC, {"directory": "corp", "mode": "follow"})
            assert refused.kind is p.Kind.ERROR and refused.body["code"] == "bad_config"
        finally:
            await bridge.close()
    run(scenario())
