"""Fixtures for integration tests: a real home (homeproc.py), real agent processes,
a real CONNECT proxy. Everything listens on 127.0.0.1 only and is stopped by PID.

* ``home_factory(connector=..., max_instances=...)`` -> a running
  :class:`homeproc.HomeProcess` (stopped at teardown).
* ``agent_factory(home_or_bundle, ...)`` -> a started :class:`AgentProcess`:
  ``tether-agent run`` with temporary ``--etc`` (the image credential laid out as
  the ansible ``identity`` role does), ``--state``, ``--firstboot`` and a fake
  DMI directory (its product UUID is the machine fingerprint: two directories
  are two machines).
* ``tinyproxy`` -> a started :class:`Tinyproxy` with basic auth.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

import homeproc
from homeproc import (AGENT, HomeProcess, LoggedProcess, Tinyproxy, agent_run_args, fake_dmi, free_port,
                      spawn_agent)


def install_credential(bundle: Path, etc: Path, home_urls: list[str] | None = None) -> Path:
    """Write the appliance's /etc/tether files from a credential bundle file."""
    return homeproc.install_credential(json.loads(Path(bundle).read_text()), etc, home_urls)


class AgentProcess(LoggedProcess):
    """One ``tether-agent run`` process with its own state and machine."""

    def __init__(self, root: Path, etc: Path, *, name: str = "agent",
                 firstboot: dict | None = None, extra_args: list[str] | None = None,
                 product_uuid: str | None = None, env: dict | None = None) -> None:
        self.root = root / name
        self.extra_env = dict(env or {})
        self.root.mkdir(parents=True, exist_ok=True)
        self.etc = etc
        self.state = self.root / "state"
        self.dmi = fake_dmi(self.root / "dmi", product_uuid)
        self.firstboot = self.root / "firstboot.json"
        if firstboot is not None:
            self.firstboot.write_text(json.dumps(firstboot))
        self.log_path = self.root / "agent.log"
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen | None = None

    @property
    def fingerprint(self) -> str:
        return "uuid:" + (self.dmi / "product_uuid").read_text().strip().lower()

    def command(self) -> list[str]:
        return agent_run_args(self.etc, self.state, self.firstboot, self.dmi, self.extra_args)

    def start(self) -> "AgentProcess":
        self.proc = spawn_agent(self.command(), self.log_path, self.extra_env)
        return self

    def wait_log(self, needle: str, timeout: float = 30.0, count: int = 1) -> str:
        """Wait until ``needle`` appears ``count`` times in the agent's log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if text.count(needle) >= count:
                return text
            if not self.alive():
                break
            time.sleep(0.1)
        raise AssertionError(f"agent log has no {needle!r} (x{count}) after {timeout} s; "
                             f"alive={self.alive()}; log tail:\n{self.log()[-3000:]}")


@pytest.fixture
def home_factory(tmp_path):
    """Start real homes; all are stopped (SIGTERM by PID) at teardown."""
    started: list[HomeProcess] = []

    def make(connector: str = "acme", max_instances: int = 1, **kwargs) -> HomeProcess:
        home = HomeProcess.start(tmp_path / f"home{len(started)}", connector=connector,
                                 max_instances=max_instances, **kwargs)
        started.append(home)
        return home
    yield make
    for home in started:
        home.stop()


@pytest.fixture
def agent_factory(tmp_path):
    """Start real agent processes from a credential bundle; stopped at teardown."""
    started: list[AgentProcess] = []

    def make(bundle: dict, *, home_urls: list[str] | None = None, name: str | None = None,
             firstboot: dict | None = None, args: list[str] | None = None,
             product_uuid: str | None = None, etc: Path | None = None,
             env: dict | None = None, start: bool = True) -> AgentProcess:
        name = name or f"agent{len(started)}"
        if etc is None:
            etc = install_credential(Path(bundle["path"]), tmp_path / name / "etc", home_urls)
        agent = AgentProcess(tmp_path, etc, name=name, firstboot=firstboot,
                             extra_args=args, product_uuid=product_uuid, env=env)
        started.append(agent)
        return agent.start() if start else agent
    yield make
    for agent in started:
        agent.stop()


@pytest.fixture
def tinyproxy(tmp_path):
    proxy = Tinyproxy(tmp_path).start()
    yield proxy
    proxy.stop()


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.25, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; that value is returned."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


@pytest.fixture
def waiter():
    """``waiter(predicate, timeout, what=...)``: poll until true (see wait_for)."""
    return wait_for


# Helpers as fixtures: test modules cannot `import conftest` reliably (another
# conftest.py, e.g. ldap/, may own that module name in the same pytest run).

@pytest.fixture
def unused_port():
    """``unused_port()``: a loopback TCP port nobody listens on right now."""
    return free_port


@pytest.fixture
def credential_installer():
    """``credential_installer(bundle_path, etc_dir, home_urls=None)`` (see install_credential)."""
    return install_credential


@pytest.fixture
def agent_command():
    """Path of the ``tether-agent`` console script in this venv."""
    return AGENT


class ScriptedHome:
    """A protocol peer in home's place, scripted by the test.

    For what the real home never does (tampered pushes, certificates that are
    due for renewal at once): it serves on a given port with *home's own*
    server certificate and CA (from ``home.state``), so the unmodified agent
    process trusts it, and speaks the real :class:`tether.protocol.Session`.

    ``on_request(message) -> body`` answers agent requests other than hello
    (raise ``ScriptedHome.Refuse(code, detail)`` for an error reply);
    ``pushes`` are sent as ``config.push`` after the hello of socket 0.
    Everything seen is recorded in ``requests``, ``answers`` and ``events``.
    """

    class Refuse(Exception):
        def __init__(self, code: str, detail: str) -> None:
            super().__init__(detail)
            self.code, self.detail = code, detail

    def __init__(self, home: HomeProcess, port: int | None = None, on_request=None,
                 pushes: list[dict] | None = None) -> None:
        import threading

        self.home = home
        self.port = port or home.port
        self.on_request = on_request
        self.pushes = list(pushes or [])
        self.requests: list = []
        self.answers: list[dict] = []
        self.events: list = []
        self.ready = threading.Event()
        self._stop = None
        self._loop = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _context(self):
        import ssl

        state = self.home.state
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(state / "ca.crt"))
        ctx.load_cert_chain(str(state / "server.crt"), str(state / "server.key"))
        return ctx

    def config_key_pem(self) -> str:
        from tether import configsig

        key = configsig.load_private_key((self.home.state / "config-signing.key").read_bytes())
        return configsig.public_key_pem(key).decode()

    async def _handler(self, ws) -> None:
        from tether import protocol as p

        session = p.Session(role=p.Role.HOME)
        async for data in ws:
            session.receive(data)
            for ev in session.events_received():
                if isinstance(ev, p.RequestReceived):
                    self.requests.append(ev.message)
                    self._answer(session, ev.message)
                elif isinstance(ev, (p.ResponseReceived, p.ErrorReceived)):
                    self.answers.append({"kind": ev.message.kind.value, **ev.message.body})
                elif isinstance(ev, p.EventReceived):
                    self.events.append(ev.message)
            for text in session.data_to_send():
                await ws.send(text)

    def _answer(self, session, message) -> None:
        from tether import protocol as p

        if message.op is p.Op.HELLO:
            body = message.body
            session.respond(message, {
                "home_version": "scripted", "server_time": time.time(), "role": "instance",
                "connector": self.home.connector, "instance_id": body.get("instance_id"),
                "heartbeat_seconds": 30, "config_key_pem": self.config_key_pem()})
            if body.get("socket_index") == 0:
                for document in self.pushes:
                    session.request(p.Op.CONFIG_PUSH, {"config": document})
            return
        try:
            if self.on_request is None:
                raise self.Refuse("unavailable", "scripted home serves hello only")
            session.respond(message, self.on_request(message))
        except self.Refuse as refusal:
            session.fail(message, refusal.code, refusal.detail)

    def _run(self) -> None:
        import asyncio

        from websockets.asyncio.server import serve

        from tether import protocol as p

        async def main():
            self._stop = asyncio.Event()
            self._loop = asyncio.get_running_loop()
            async with serve(self._handler, "127.0.0.1", self.port, ssl=self._context(),
                             subprotocols=[p.SUBPROTOCOL]):
                self.ready.set()
                await self._stop.wait()
        asyncio.run(main())

    def __enter__(self) -> "ScriptedHome":
        self._thread.start()
        if not self.ready.wait(10):
            raise RuntimeError(f"scripted home did not listen on 127.0.0.1:{self.port}")
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def scripted_home():
    """The :class:`ScriptedHome` class (use it as a context manager)."""
    return ScriptedHome
