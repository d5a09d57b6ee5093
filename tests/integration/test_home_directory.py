"""Home's directory service against real TLS sockets: leaders, change intake, routing, CLI.

Two connectors (``c-a``, ``c-b``) in cluster ``east`` both serve directory ``corp``.
The server runs in the test's event loop (HomeServer); each connector is a
:class:`FakeConnector`, a RawAgent whose reader task answers home's requests the
way a directory-serving agent would (or drops its socket, on request). The CLI
runs as a real subprocess (in a thread, so the in-process server keeps serving
its control socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from homeproc import HomeProcess, RawAgent, client_context, enroll, running
from tether import protocol as p

pytestmark = pytest.mark.timeout(300)
TETHER_HOME = str(Path(sys.executable).parent / "tether-home")
CONFIG = {"directories": [{"id": "corp", "kind": "openldap"}]}


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def enrolled(tmp_path_factory):
    """A state dir with connectors c-a and c-b (cluster east), one instance each,
    both configured for directory corp; the server is stopped again."""
    tmp = tmp_path_factory.mktemp("dirhome")
    home = HomeProcess.start(tmp, connector="c-a", max_instances=1, cluster="east")
    try:
        home.cli("connector", "create", "c-b", "--cluster", "east")
        creds = {}
        for name in ("c-a", "c-b"):
            home.set_config(CONFIG, connector=name)
            bundle = home.issue_image(connector=name)
            iid, cert, key, _ = asyncio.run(enroll(home, bundle, tmp, f"vm-{name}"))
            creds[name] = (bundle, iid, cert, key)
    finally:
        home.stop()
    return home, creds


@pytest.fixture
def env(enrolled, tmp_path):
    """A private copy of the enrolled state for one test."""
    home, creds = enrolled
    state = tmp_path / "state"
    shutil.copytree(home.state, state, ignore=shutil.ignore_patterns("control.sock"))
    return state, creds, tmp_path


def cli_sync(state: Path, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([TETHER_HOME, *args, "--state", str(state)], capture_output=True,
                          text=True, timeout=120, input=input, check=False)


async def cli(state: Path, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    """The CLI while the in-process server keeps running (it answers the control socket)."""
    return await asyncio.to_thread(cli_sync, state, *args, input=input)


class FakeConnector:
    """One instance socket that serves home's requests like a directory agent.

    ``handlers[op](message)`` returns a response body, ``("fail", code, detail)``
    for an error reply, or ``"drop"`` to abort the socket without answering.
    The socket is driven by the protocol's :class:`~tether.protocol.Connection`,
    like a real agent's.
    """

    def __init__(self, name: str, agent: RawAgent, iid: str) -> None:
        self.name, self.agent, self.iid = name, agent, iid
        self.received: list[p.Message] = []
        self.handlers: dict = {}
        self.connection = _Served(self)
        self.task: asyncio.Task | None = None

    @classmethod
    async def connect(cls, name: str, url: str, creds: dict, tmp: Path) -> FakeConnector:
        bundle, iid, cert, key = creds[name]
        agent = await RawAgent.connect(url, client_context(bundle["ca_pem"], cert, key, tmp))
        hello = await agent.hello(bundle["image_id"], iid, fingerprint=f"vm-{name}",
                                  config_version=1)
        assert isinstance(hello, p.ResponseReceived), hello
        conn = cls(name, agent, iid)
        for ev in agent.inbox:  # requests that arrived with the hello answer
            if isinstance(ev, p.RequestReceived):
                conn.connection.serve(ev.message)
        conn.task = asyncio.create_task(conn.connection.run())
        return conn

    async def _answer(self, msg: p.Message) -> dict:
        self.received.append(msg)
        handler = self.handlers.get(msg.op)
        if handler is not None:
            result = handler(msg)
        elif msg.op is p.Op.CONFIG_PUSH:
            result = {"version": 1, "applied": True}
        elif msg.op is p.Op.SYNC:
            result = {"cursor": None, "following": msg.body["mode"] != "stop", "pending": 0}
        elif msg.op is p.Op.AUTHENTICATE:
            result = {"ok": True, "outcome": "success", "dn": f"uid={msg.body['username']},dc=x",
                      "groups": ["cn=staff,dc=x"], "server": self.name}
        else:
            result = ("fail", "unavailable", "not scripted")
        if result == "drop":
            self.agent.ws.transport.abort()
            raise asyncio.CancelledError  # answer nothing
        if isinstance(result, tuple) and result[0] == "chunks":
            for body in result[1]:
                await self.connection.send_chunk(msg, body)
            return result[2]
        if isinstance(result, tuple):
            raise p.HandlerError(result[1], result[2])
        return result

    async def changes(self, entries: list[dict], directory: str = "corp"):
        return await self.connection.exchange(p.Op.DIRECTORY_CHANGES,
                                              {"directory": directory, "entries": entries})

    def syncs(self) -> list[dict]:
        return [m.body for m in self.received if m.op is p.Op.SYNC]

    def ops(self, op: p.Op) -> int:
        return sum(1 for m in self.received if m.op is op)

    async def close(self) -> None:
        await self.agent.close()
        if self.task:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


class _Served(p.Connection):
    """A FakeConnector's socket: home's requests go to its scripted answers."""

    def __init__(self, fake: FakeConnector) -> None:
        super().__init__(fake.agent.ws, fake.agent.session, name=fake.name)
        self.fake = fake

    async def handle_request(self, message: p.Message) -> dict:
        return await self.fake._answer(message)


async def until(predicate, what: str, timeout: float = 30.0):
    """Poll (event loop keeps running) until predicate() is truthy."""
    for _ in range(int(timeout / 0.05)):
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def user(rid: str, name: str) -> dict:
    return {"op": "upsert", "kind": "user", "id": rid, "dn": f"uid={name},dc=x",
            "attributes": {"username": name, "mail": f"{name}@x"}}


def full_stream(records: list[dict], cursor: str, first_seq: int = 1) -> list[dict]:
    msgs = [{"type": "begin", "mode": "full", "directory": "corp"},
            {"type": "chunk", "seq": 1, "changes": records},
            {"type": "end", "mode": "full", "cursor": cursor, "count": len(records)}]
    return [{"seq": first_seq + i, "message": m} for i, m in enumerate(msgs)]


def incremental(records: list[dict], cursor: str, first_seq: int) -> list[dict]:
    msgs = [{"type": "begin", "mode": "incremental", "directory": "corp"},
            {"type": "chunk", "seq": 1, "changes": records},
            {"type": "end", "mode": "incremental", "cursor": cursor, "count": len(records)}]
    return [{"seq": first_seq + i, "message": m} for i, m in enumerate(msgs)]


def usernames(server) -> list[str]:
    return sorted(e["attributes"]["username"] for e in server.directory_store.entries("corp"))


# ------------------------------------------------------------------ tests


def test_leader_follow_changes_and_failover_with_cursor(env):
    state, creds, tmp = env

    async def go():
        async with running(state) as (server, url):
            b = await FakeConnector.connect("c-b", url, creds, tmp)
            # the only connected instance leads, with no cursor yet
            await until(lambda: b.syncs(), "sync follow to c-b")
            assert b.syncs()[0] == {"directory": "corp", "mode": "follow", "cursor": None}
            a = await FakeConnector.connect("c-a", url, creds, tmp)
            # c-a is the default primary (alphabetically first): it takes over, c-b stops
            await until(lambda: a.syncs(), "sync follow to c-a")
            await until(lambda: any(s["mode"] == "stop" for s in b.syncs()), "stop to c-b")
            assert a.syncs() == [{"directory": "corp", "mode": "follow", "cursor": None}]
            assert server.hub.directories.leaders["corp"] == a.iid

            batch = full_stream([user("1", "ann"), user("2", "bob")], "cursor-1")
            reply = await a.changes(batch)
            assert reply.message.body == {"applied_through": 3, "leader": True}
            again = await a.changes(batch)  # response "lost": the agent re-sends
            assert again.message.body == {"applied_through": 3, "leader": True}
            dropped = await b.changes(full_stream([user("9", "zed")], "b-cursor", 40))
            assert dropped.message.body == {"applied_through": 42, "leader": False}
            assert usernames(server) == ["ann", "bob"]
            assert server.directory_store.cursor("corp") == "cursor-1"
            assert server.directory_store.status("corp")["applied_through"] == {a.iid: 3, b.iid: 42}

            bad = await a.changes([{"seq": 5, "message": {"type": "chunk", "changes": []}},
                                   {"seq": 4, "message": {"type": "end"}}])
            assert isinstance(bad, p.ErrorReceived) and bad.message.body["code"] == "bad_type"
            bad = await a.changes([{"seq": 6, "message": {"type": "nonsense"}}])
            assert isinstance(bad, p.ErrorReceived) and bad.message.body["code"] == "bad_type"

            before = len(b.syncs())
            await a.close()  # the leader's last socket goes: c-b follows from home's cursor
            await until(lambda: len(b.syncs()) > before, "sync follow to c-b after failover")
            assert b.syncs()[-1] == {"directory": "corp", "mode": "follow",
                                     "cursor": "cursor-1"}
            assert server.hub.directories.leaders["corp"] == b.iid
            reply = await b.changes(incremental([user("3", "cid")], "cursor-2", 43))
            assert reply.message.body == {"applied_through": 45, "leader": True}
            assert usernames(server) == ["ann", "bob", "cid"]
            assert server.directory_store.cursor("corp") == "cursor-2"

            status = await cli(state, "directory", "status", "--json")
            assert status.returncode == 0, status.stderr
            row = json.loads(status.stdout)["directories"][0]
            assert row["directory"] == "corp" and row["leader"] == b.iid
            assert row["users"] == 3 and row["cursor"] == "cursor-2"
            assert row["policy"] == "failover" and row["primary"] == "c-a"
            assert row["applied_through"] == {a.iid: 3, b.iid: 45}
            assert row["last_change"] is not None
            await b.close()
    asyncio.run(go())


def test_authenticate_routing_failover_round_robin_and_retry(env):
    state, creds, tmp = env
    body = ("corp", "ann", "pw")

    async def go():
        async with running(state) as (server, url):
            router = server.hub.directories
            a = await FakeConnector.connect("c-a", url, creds, tmp)
            b = await FakeConnector.connect("c-b", url, creds, tmp)
            await until(lambda: router.leaders.get("corp") == a.iid, "c-a leading")
            served = [(await router.authenticate(*body))["server"] for _ in range(4)]
            assert served == ["c-a"] * 4  # failover: the primary serves everything

            result = await cli(state, "cluster", "set", "east", "--policy", "round-robin")
            assert result.returncode == 0, result.stderr
            assert "round-robin" in result.stdout and "re-elected" in result.stdout
            served = [(await router.authenticate(*body))["server"] for _ in range(4)]
            assert sorted(served) == ["c-a", "c-a", "c-b", "c-b"]
            assert router.leaders["corp"] == a.iid  # round-robin keeps the leader (sticky)

            result = await cli(state, "cluster", "set", "east", "--policy", "failover",
                               "--primary", "c-b")
            assert result.returncode == 0, result.stderr
            await until(lambda: router.leaders.get("corp") == b.iid, "c-b leading")
            await until(lambda: any(s["mode"] == "stop" for s in a.syncs()), "stop to c-a")
            served = [(await router.authenticate(*body))["server"] for _ in range(3)]
            assert served == ["c-b"] * 3
            listing = await cli(state, "cluster", "list")
            assert "east\tpolicy=failover\tprimary=c-b\tconnectors=c-a,c-b" in listing.stdout

            # the primary drops its socket mid-request: retried on c-a, the caller sees success
            b.handlers[p.Op.AUTHENTICATE] = lambda msg: "drop"
            tried = b.ops(p.Op.AUTHENTICATE)
            answer = await router.authenticate(*body)
            assert answer["server"] == "c-a" and answer["outcome"] == "success"
            assert b.ops(p.Op.AUTHENTICATE) == tried + 1  # it did get (and lose) the request
            # an agent answering "unavailable" (directory down) is also skipped
            a.handlers[p.Op.AUTHENTICATE] = lambda msg: ("fail", "unavailable", "DC down")
            with pytest.raises(Exception) as failed:
                await router.authenticate(*body)
            assert "DC down" in str(failed.value)
            await a.close()
    asyncio.run(go())


def test_search_collects_chunks_and_fails_over(env):
    state, creds, tmp = env

    async def go():
        async with running(state) as (server, url):
            router = server.hub.directories
            a = await FakeConnector.connect("c-a", url, creds, tmp)
            b = await FakeConnector.connect("c-b", url, creds, tmp)
            a.handlers[p.Op.SEARCH] = lambda msg: ("fail", "unavailable", "no LDAP server")
            b.handlers[p.Op.SEARCH] = lambda msg: ("chunks", [
                {"entries": [user("1", "ann")]}, {"entries": [user("2", "bob")]}],
                {"entries": 2, "truncated": False})
            found = await router.search("corp", "user", "(uid=*)", 10)
            assert [e["dn"] for e in found["entries"]] == ["uid=ann,dc=x", "uid=bob,dc=x"]
            assert found["truncated"] is False
            assert a.ops(p.Op.SEARCH) == 1 and b.ops(p.Op.SEARCH) == 1  # primary first
            assert b.received[-1].body == {"directory": "corp", "kind": "user",
                                           "filter": "(uid=*)", "limit": 10}
            await a.close()
            await b.close()
    asyncio.run(go())


def test_provision_is_never_retried(env):
    state, creds, tmp = env
    order = {"id": "o-1", "op": "disable_user", "dn": "uid=ann,dc=x"}

    async def go():
        async with running(state) as (server, url):
            router = server.hub.directories
            a = await FakeConnector.connect("c-a", url, creds, tmp)
            b = await FakeConnector.connect("c-b", url, creds, tmp)
            done = {"ok": True, "result": {"id": "o-1", "op": "disable_user", "status": "done"}}
            a.handlers[p.Op.PROVISION] = lambda msg: done
            first = await router.provision("corp", order)
            assert first["result"]["status"] == "done" and first["instance"] == a.iid
            a.handlers[p.Op.PROVISION] = lambda msg: "drop"
            lost = await router.provision("corp", {**order, "id": "o-2"})
            assert lost["ok"] is False and lost["result"]["outcome_unknown"] is True
            assert lost["result"]["id"] == "o-2" and "may or may not" in lost["result"]["reason"]
            assert a.ops(p.Op.PROVISION) == 2 and b.ops(p.Op.PROVISION) == 0
            # an agent's own failure answer is final too
            b.handlers[p.Op.PROVISION] = lambda msg: ("fail", "unavailable", "LDAP down")
            await until(lambda: router.leaders.get("corp") == b.iid, "c-b leading")
            with pytest.raises(Exception, match="LDAP down"):
                await router.provision("corp", {**order, "id": "o-3"})
            assert b.ops(p.Op.PROVISION) == 1
            # through the CLI (home's API over the control socket)
            b.handlers[p.Op.PROVISION] = lambda msg: {**done, "result": {
                **done["result"], "id": msg.body["order"]["id"]}}
            path = tmp / "order.json"
            path.write_text(json.dumps({**order, "id": "o-4"}))
            result = await cli(state, "provision", "--directory", "corp", "--order", str(path))
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout)["result"] == {"id": "o-4", "op": "disable_user",
                                                           "status": "done"}
            await b.close()
    asyncio.run(go())


def test_cli_authenticate_export_and_errors(env):
    state, creds, tmp = env

    def auth(msg):
        if msg.body["password"] != "s3cret":
            return {"ok": False, "outcome": "wrong_password", "dn": None, "groups": []}
        return {"ok": True, "outcome": "success", "dn": "uid=ann,dc=x",
                "groups": ["cn=staff,dc=x", "cn=admins,dc=x"], "server": "ldap1"}

    async def go():
        async with running(state) as (server, url):
            router = server.hub.directories
            # configured, but nobody connected: exit 2 with what to do
            result = await cli(state, "authenticate", "ann", "--directory", "corp",
                               input="s3cret\n")
            assert result.returncode == 2 and "connected" in result.stderr, result
            a = await FakeConnector.connect("c-a", url, creds, tmp)
            a.handlers[p.Op.AUTHENTICATE] = auth
            await until(lambda: router.leaders.get("corp") == a.iid, "c-a leading")
            result = await cli(state, "authenticate", "ann", "--directory", "corp",
                               input="s3cret\n")
            assert result.returncode == 0, result.stderr
            assert result.stdout.splitlines() == ["outcome: success", "dn: uid=ann,dc=x",
                                                  "group: cn=staff,dc=x", "group: cn=admins,dc=x"]
            assert a.received[-1].body["password"] == "s3cret"  # newline stripped
            wrong = tmp / "pw"
            wrong.write_text("nope")
            result = await cli(state, "authenticate", "ann", "--directory", "corp",
                               "--password-file", str(wrong))
            assert result.returncode == 1 and "outcome: wrong_password" in result.stdout
            result = await cli(state, "authenticate", "ann", "--directory", "nowhere",
                               input="x\n")
            assert result.returncode == 2 and "unknown directory" in result.stderr
            result = await cli(state, "authenticate", "ann", "--directory", "corp", input="\n")
            assert result.returncode == 2 and "empty password" in result.stderr

            records = [user("u1", "ann"), user("u2", "bob"),
                       {"op": "upsert", "kind": "group", "id": "g1", "dn": "cn=staff,dc=x",
                        "attributes": {"name": "staff"}, "members": ["uid=ann,dc=x"]}]
            await a.changes(full_stream(records, "c1"))
            live = json.loads((await cli(state, "status", "--json")).stdout)
            assert live["directories"][0]["leader"] == a.iid
            assert live["directories"][0]["users"] == 2
            await a.close()
    asyncio.run(go())
    # the server is stopped: export reads identity.db directly
    result = cli_sync(state, "authenticate", "ann", "--directory", "corp", input="x\n")
    assert result.returncode == 2 and "not running" in result.stderr
    out = tmp / "corp.csv"
    result = cli_sync(state, "export", "--directory", "corp", "--csv", str(out))
    assert result.returncode == 0, result.stderr
    assert "2 user(s), 1 group(s)" in result.stdout
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["kind"], r["id"], r["dn"]) for r in rows] == [
        ("user", "u1", "uid=ann,dc=x"), ("user", "u2", "uid=bob,dc=x"),
        ("group", "g1", "cn=staff,dc=x")]
    assert rows[0]["member_of"] == "cn=staff,dc=x" and rows[1]["member_of"] == ""
    assert rows[0]["mail"] == "ann@x" and rows[2]["members"] == "uid=ann,dc=x"
    assert list(rows[0]) == ["kind", "id", "dn", "mail", "name", "username", "disabled",
                             "member_of", "members"]
    result = cli_sync(state, "export", "--directory", "other", "--csv", str(tmp / "x.csv"))
    assert result.returncode == 2 and "unknown directory 'other'" in result.stderr
    assert "corp" in result.stderr and not (tmp / "x.csv").exists()
    status = cli_sync(state, "directory", "status")
    assert status.returncode == 0 and "server: not running" in status.stdout
    assert "users=2 groups=1 cursor=c1" in status.stdout
