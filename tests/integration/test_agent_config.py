"""Signed configuration on a real agent process: push from a real home, secrets
sealed on disk, tampered documents refused with the last good one kept, a
tampered last-good file refused at start.

The tampered push needs a peer that sends one: the real home never does, so
:class:`HostileHome` takes home's place on its port with home's own server
certificate (a stolen-key / compromised-relay scenario) and speaks the real
protocol (:class:`tether.protocol.Session`) to the unmodified agent process.
"""

from __future__ import annotations

import asyncio
import copy
import json
import ssl
import threading
import time

import pytest
from websockets.asyncio.server import serve

from tether import configsig
from tether import protocol as p

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

CONFIG = {"directories": [{"name": "corp-ad", "bind_password": "Bind-Pa55!"}],
          "agent": {"note": "v1"}}


class HostileHome:
    """Serves on home's address with home's certificate; pushes given documents."""

    def __init__(self, home, documents: list[dict]) -> None:
        self.home = home
        self.documents = documents
        self.answers: list[dict] = []
        self.acks: list[dict] = []
        self.ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def _context(self) -> ssl.SSLContext:
        state = self.home.state
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(state / "ca.crt"))
        ctx.load_cert_chain(str(state / "server.crt"), str(state / "server.key"))
        return ctx

    async def _handler(self, ws) -> None:
        session = p.Session(role=p.Role.HOME)
        key_pem = configsig.public_key_pem(configsig.load_private_key(
            (self.home.state / "config-signing.key").read_bytes())).decode()
        async for data in ws:
            session.receive(data)
            for ev in session.events_received():
                if isinstance(ev, p.RequestReceived) and ev.message.op is p.Op.HELLO:
                    body = ev.message.body
                    session.respond(ev.message, {
                        "home_version": "hostile", "server_time": time.time(),
                        "role": "instance", "connector": self.home.connector,
                        "instance_id": body.get("instance_id"), "heartbeat_seconds": 30,
                        "config_key_pem": key_pem})
                    if body.get("socket_index") == 0:
                        for document in self.documents:
                            session.request(p.Op.CONFIG_PUSH, {"config": document})
                elif isinstance(ev, (p.ResponseReceived, p.ErrorReceived)):
                    self.answers.append({"kind": ev.message.kind.value, **ev.message.body})
                elif isinstance(ev, p.EventReceived) and ev.message.op is p.Op.CONFIG_ACK:
                    self.acks.append(ev.message.body)
            for text in session.data_to_send():
                await ws.send(text)

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        async with serve(self._handler, "127.0.0.1", self.home.port, ssl=self._context(),
                         subprotocols=[p.SUBPROTOCOL]):
            self.ready.set()
            await self._stop.wait()

    def __enter__(self) -> "HostileHome":
        self._thread.start()
        assert self.ready.wait(10), "hostile home did not start"
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def instance_row(home):
    rows = home.status()["instances"]
    return rows[0] if rows else None


def test_push_applies_and_secrets_stay_sealed_on_disk(home_factory, agent_factory, waiter):
    home = home_factory()
    agent = agent_factory(home.issue_image())
    agent.wait_log("socket 1 connected")
    home.set_config(CONFIG)
    agent.wait_log("configuration v1 applied")
    on_disk = (agent.state / "config.json").read_text()
    assert "Bind-Pa55!" not in on_disk and "tether-sealed:v1:" in on_disk
    assert oct((agent.state / "config.json").stat().st_mode & 0o777) == "0o600"
    row = waiter(lambda: (r := instance_row(home)) and r["config_status"] == "applied" and r,
                 15, what="config applied in status")
    assert row["config_version"] == 1


def test_tampered_push_refused_last_good_kept(home_factory, agent_factory, waiter):
    home = home_factory()
    agent = agent_factory(home.issue_image())
    agent.wait_log("socket 1 connected")
    home.set_config(CONFIG)
    agent.wait_log("configuration v1 applied")
    good = (agent.state / "config.json").read_bytes()

    altered = json.loads(good)  # home's v1, edited after signing
    altered["payload"]["version"] = 2
    altered["payload"]["config"]["agent"]["note"] = "evil"
    rogue = configsig.sign_config(configsig.generate_signing_key(), {"agent": {}},
                                  version=3, connector=home.connector)
    home.stop()
    with HostileHome(home, [altered, rogue]) as hostile:
        waiter(lambda: len(hostile.answers) >= 2, 75, what="the agent's answers to both pushes")
    assert [a["kind"] for a in hostile.answers] == ["error", "error"]
    assert {a["code"] for a in hostile.answers} == {"bad_signature"}
    assert any(a["status"] == "rejected" and a["error"] == "bad_signature"
               for a in hostile.acks)
    assert agent.alive()
    assert (agent.state / "config.json").read_bytes() == good  # last good kept
    assert agent.log().count("configuration refused") >= 2

    home.serve()  # the real home again: the agent runs v1 and says so
    row = waiter(lambda: (r := instance_row(home)) and r["connected_sockets"] == 2 and r, 75,
                 what="agent back at the real home")
    assert row["config_version"] == 1


def test_tampered_last_good_file_refused_at_start(home_factory, agent_factory, waiter):
    home = home_factory()
    agent = agent_factory(home.issue_image())
    agent.wait_log("socket 1 connected")
    home.set_config(CONFIG)
    agent.wait_log("configuration v1 applied")
    agent.stop()
    path = agent.state / "config.json"
    document = json.loads(path.read_text())
    edited = copy.deepcopy(document)
    edited["payload"]["config"]["agent"]["note"] = "edited on disk"
    path.write_text(json.dumps(edited))

    home.stop()  # home away: the agent must not run from the edited file
    agent.start()
    text = agent.wait_log("last good configuration").split("tether-agent starting")[-1]
    assert "refused" in text and "signature does not verify" in text
    assert "running from last good configuration" not in text

    home.serve()  # home back: it pushes v1 again, properly signed
    agent.wait_log("configuration v1 applied", count=2, timeout=75)
    fresh = json.loads(path.read_text())  # re-sealed and re-signed, same content
    assert fresh["payload"]["version"] == document["payload"]["version"] == 1
    assert fresh["payload"]["config"]["agent"] == {"note": "v1"}
