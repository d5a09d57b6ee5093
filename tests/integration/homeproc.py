"""Start and stop a real ``tether-home serve`` process on 127.0.0.1 for tests.

Usage (pytest fixture or plain code)::

    from homeproc import HomeProcess   # tests in tests/integration/ (pytest puts it on sys.path)

    with HomeProcess.start(tmp_path, connector="acme", max_instances=1) as home:
        bundle = home.issue_image()            # dict: the credential bundle
        home.url                               # "wss://127.0.0.1:PORT/"
        home.cli("status", "--json")           # CompletedProcess of tether-home
        home.status()                          # parsed status --json
        home.restart()                         # same state dir, same port
    # leaving the block stops the server (SIGTERM, then SIGKILL) by PID

Also here: :class:`RawAgent`, a bare protocol client over a real socket (for
bad frames and scripted exchanges), :func:`client_context`, :func:`enroll`,
:class:`Tinyproxy` (a real CONNECT proxy) and :func:`fake_rauc` (a logging
stand-in for ``rauc`` where RAUC cannot run without A/B slots; bench/ uses them too).

The server listens on port 0 (the kernel picks a free port, no race); the
bound port is read back through home's control socket, which is also how
"listening" is detected. Server logs go to ``<tmp>/home.log``
(:meth:`HomeProcess.log_text`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tether.home import control
from tether.home.paths import StatePaths
from tether.home.server import HomeServer, Listen

VENV_BIN = Path(sys.executable).parent
TETHER_HOME = str(VENV_BIN / "tether-home")
AGENT = VENV_BIN / "tether-agent"
START_TIMEOUT = 30.0


def stop_process(proc: subprocess.Popen | None, timeout: float = 15.0) -> int | None:
    """Stop a process this test started, by PID: SIGTERM, wait, then SIGKILL.

    Returns its exit status (None when there was no process).
    """
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


# ------------------------------------------------------------ in-process server


@contextlib.asynccontextmanager
async def running(state: Path, timeout: float = 20.0):
    """``async with running(home.state) as (server, url):`` a HomeServer in this event loop.

    It listens on a port the kernel picks; ``url`` is its ``wss://`` address. Leaving
    the block stops the server and waits for it.
    """
    server = HomeServer(StatePaths(state), Listen("127.0.0.1", 0))
    task = asyncio.create_task(server.run())
    for _ in range(int(timeout / 0.05)):
        if server.bound:
            break
        await asyncio.sleep(0.05)
    try:
        yield server, f"wss://127.0.0.1:{server.bound[0][1]}/"
    finally:
        server.stop()
        await task


# ------------------------------------------------------------ agent processes


def install_credential(bundle: dict, etc: Path, home_urls: list[str] | None = None) -> Path:
    """Write the appliance's /etc/tether files from a credential bundle (its JSON, as a dict)."""
    etc.mkdir(parents=True, exist_ok=True)
    key = etc / "image.key"
    key.write_text(bundle["key_pem"])
    key.chmod(0o600)
    (etc / "image.crt").write_text(bundle["cert_pem"])
    (etc / "ca.crt").write_text(bundle["ca_pem"])
    (etc / "agent.json").write_text(json.dumps({
        "image_id": bundle["image_id"], "connector": bundle["connector"],
        "home_urls": home_urls or bundle["home_urls"], "fingerprint": bundle["fingerprint"],
        "cert_serial": bundle["cert_serial"]}))
    return etc


def fake_dmi(directory: Path, product_uuid: str | None = None, vendor: str = "QEMU",
             product: str = "Standard PC (Q35 + ICH9, 2009)") -> Path:
    """A /sys/class/dmi/id stand-in: the machine the agent believes it runs on."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sys_vendor").write_text(vendor + "\n")
    (directory / "product_name").write_text(product + "\n")
    (directory / "product_uuid").write_text((product_uuid or str(uuid.uuid4())) + "\n")
    return directory


def agent_run_args(etc: Path, state: Path, firstboot: Path, dmi: Path,
                  extra_args: list[str] | tuple[str, ...] = ()) -> list[str]:
    """``tether-agent run`` with its directories given and DEBUG logging."""
    return [str(AGENT), "run", "--etc", str(etc), "--state", str(state),
            "--firstboot", str(firstboot), "--dmi-dir", str(dmi),
            "--log-level", "DEBUG", *extra_args]


def spawn_agent(command: list[str], log_path: Path,
                extra_env: dict | None = None) -> subprocess.Popen:
    """Start an agent in its own session, output appended to ``log_path``.

    Proxy and systemd variables of the test's environment are not passed on.
    """
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy",
                                "notify_socket", "watchdog_usec")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra_env or {})
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)


FAKE_RAUC = """#!{python}
# A stand-in for rauc written by tests/integration/homeproc.py: logs every call to
# calls.jsonl next to itself; `install` hashes the bundle it was given and fails
# (exit 1, the file's text on stderr) while install-fails exists next to it.
import hashlib, json, os, sys, time
here = os.path.dirname(os.path.abspath(__file__))
args = sys.argv[1:]
entry = {{"args": args, "time": time.time()}}
failing = None
if args[:1] == ["install"]:
    with open(args[1], "rb") as fh:
        entry["sha256"] = hashlib.file_digest(fh, "sha256").hexdigest()
    entry["size"] = os.path.getsize(args[1])
    fail = os.path.join(here, "install-fails")
    if os.path.exists(fail):
        failing = open(fail).read().strip() or "installing failed"
with open(os.path.join(here, "calls.jsonl"), "a") as log:
    log.write(json.dumps(entry) + "\\n")
if failing:
    print(failing, file=sys.stderr)
    sys.exit(1)
"""


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fake_rauc(directory: Path, install_fails: str | None = None) -> Path:
    """A ``rauc`` stand-in in ``directory`` (its calls land in ``calls.jsonl`` there).

    Only where real RAUC cannot run: an install needs A/B slots and rauc-service,
    which only the qemu appliance has (tests/e2e). ``install_fails``: the error
    text every ``rauc install`` fails with.
    """
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "rauc"
    script.write_text(FAKE_RAUC.format(python=sys.executable))
    script.chmod(0o755)
    if install_fails:
        (directory / "install-fails").write_text(install_fails + "\n")
    return script


def rauc_calls(script: Path) -> list[dict]:
    """The calls a :func:`fake_rauc` got, oldest first."""
    log = script.parent / "calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def sha256_of(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


class Tinyproxy:
    """tinyproxy on 127.0.0.1 with basic auth; CONNECT lines land in its log."""

    def __init__(self, root: Path, user: str = "agent", password: str = "pr0xy-pass") -> None:
        self.binary = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
        self.root = root / "tinyproxy"
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.user, self.password = user, password
        self.log_path = self.root / "tinyproxy.log"
        self.conf = self.root / "tinyproxy.conf"
        self.conf.write_text("\n".join([
            f"Port {self.port}", "Listen 127.0.0.1", "Timeout 600", "LogLevel Connect",
            f"LogFile \"{self.log_path}\"", "MaxClients 64", "Allow 127.0.0.1",
            f"BasicAuth {user} {password}", "DisableViaHeader Yes", ""]))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.user}:{self.password}@127.0.0.1:{self.port}"

    def start(self) -> "Tinyproxy":
        self.proc = subprocess.Popen([self.binary, "-d", "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"tinyproxy did not listen on {self.port}; see {self.log_path}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)



class LoggedProcess:
    """What tests ask of a process they started with its output in ``log_path``."""

    proc: subprocess.Popen | None
    log_path: Path

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM by PID, then SIGKILL if it does not stop; returns the exit status."""
        return stop_process(self.proc, timeout)


# ------------------------------------------------------------ home


@dataclass
class HomeProcess:
    """A running home server with its own state directory."""

    root: Path
    state: Path
    connector: str
    port: int = 0
    serve_args: tuple[str, ...] = ()
    proc: subprocess.Popen | None = None
    images: list[dict] = field(default_factory=list)

    # ------------------------------------------------------------ creation

    @classmethod
    def start(cls, tmp: Path, connector: str = "acme", max_instances: int = 1,
              cluster: str | None = None, names: tuple[str, ...] = ("127.0.0.1", "localhost"),
              port: int = 0, serve_args: tuple[str, ...] = ()) -> HomeProcess:
        """init + connector create + serve; returns once the server accepts.

        ``serve_args`` go to ``tether-home serve`` (e.g. ``("--hello-timeout", "2")``).
        """
        tmp = Path(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        home = cls(root=tmp, state=tmp / "home-state", connector=connector, port=port,
                   serve_args=tuple(serve_args))
        home.cli("init", *sum((["--name", n] for n in names), []))
        extra = ["--cluster", cluster] if cluster else []
        home.cli("connector", "create", connector, "--max-instances", str(max_instances), *extra)
        home.serve()
        return home

    def cli(self, *args: str, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run ``tether-home ARGS --state <state>``; raises with stderr when it fails."""
        command = [TETHER_HOME, *args, "--state", str(self.state)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, input=input)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n"
                               f"{result.stdout}{result.stderr}")
        return result

    # -------------------------------------------------------------- server

    @property
    def log_path(self) -> Path:
        return self.root / "home.log"

    def serve(self) -> None:
        """Start ``serve`` (port 0 the first time, then the same port) and wait."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("home is already running")
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [TETHER_HOME, "serve", "--state", str(self.state),
                 "--listen", f"127.0.0.1:{self.port}", "--log-level", "DEBUG",
                 *self.serve_args],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        self._wait_listening()

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tether-home serve exited with {self.proc.returncode}:\n"
                                   f"{self.log_text()[-4000:]}")
            live = self.live()
            if live and live.get("pid") == self.proc.pid and live.get("addresses"):
                self.port = int(live["addresses"][0].rsplit(":", 1)[1])
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"tether-home serve did not listen within {START_TIMEOUT:.0f} s:\n"
                           f"{self.log_text()[-4000:]}")

    def live(self) -> dict | None:
        """The running server's own figures (control socket), None if down."""
        try:
            return control.call(self.state / "control.sock", {"cmd": "live"}, timeout=5)
        except (OSError, ValueError):
            return None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, wait, then SIGKILL — only our own process, by PID."""
        stop_process(self.proc, timeout)

    def kill(self) -> None:
        """Hard stop (crash simulation): SIGKILL by PID."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def restart(self) -> None:
        """Stop and serve again on the same port with the same state."""
        self.stop()
        self.serve()

    def __enter__(self) -> HomeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------- helpers

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}/"

    @property
    def ca_cert(self) -> Path:
        return self.state / "ca.crt"

    def issue_image(self, connector: str | None = None, urls: list[str] | None = None) -> dict:
        """``image issue``; returns the bundle (also kept in ``self.images``)."""
        out = self.root / f"image-{len(self.images)}.json"
        args = ["image", "issue", "--connector", connector or self.connector, "--out", str(out)]
        for url in urls or [self.url]:
            args += ["--home-url", url]
        self.cli(*args)
        bundle = json.loads(out.read_text())
        bundle["path"] = str(out)
        self.images.append(bundle)
        return bundle

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json").stdout)

    def set_config(self, config: dict, connector: str | None = None) -> str:
        path = self.root / f"config-{time.monotonic_ns()}.json"
        path.write_text(json.dumps(config))
        return self.cli("config", "set", connector or self.connector, str(path)).stdout

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# ------------------------------------------------------------------ raw client


def client_context(ca_pem: str | Path, cert_pem: str | None, key_pem: str | None,
                   tmp: Path) -> ssl.SSLContext:
    """TLS 1.3 client context pinned to ``ca_pem`` with an optional client cert.

    PEM texts are written to files under ``tmp`` because :mod:`ssl` loads
    certificates from files only.
    """
    import uuid

    tmp.mkdir(parents=True, exist_ok=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if isinstance(ca_pem, Path):
        ctx.load_verify_locations(cafile=str(ca_pem))
    else:
        ctx.load_verify_locations(cadata=ca_pem)
    if cert_pem is not None:
        tag = uuid.uuid4().hex
        cert_file, key_file = tmp / f"{tag}.crt", tmp / f"{tag}.key"
        cert_file.write_text(cert_pem)
        key_file.write_text(key_pem)
        key_file.chmod(0o600)
        ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


class RawAgent:
    """A minimal protocol client for tests: one socket, explicit steps.

    It drives a real :class:`tether.protocol.Session` over a real websockets
    connection, so tests can also send hand-made bad frames (:meth:`send_raw`).
    """

    def __init__(self, ws) -> None:
        from tether import protocol as p

        self.p = p
        self.ws = ws
        self.session = p.Session(p.Role.AGENT)
        self.inbox: list = []  # events that arrived while call() waited for its answer

    @classmethod
    async def connect(cls, url: str, ssl_context, subprotocols=None,
                      close_timeout: float = 10) -> RawAgent:
        """``close_timeout``: how long to wait for home to end TLS after the close
        handshake (attack tests use 1: a hostile client does not wait politely)."""
        from websockets.asyncio.client import connect

        from tether import protocol as p

        ws = await connect(url, ssl=ssl_context, open_timeout=10,
                           subprotocols=subprotocols or [p.SUBPROTOCOL],
                           max_size=4 * p.MAX_FRAME_BYTES, close_timeout=close_timeout)
        return cls(ws)

    async def flush(self) -> None:
        for text in self.session.data_to_send():
            await self.ws.send(text)

    async def next_events(self, timeout: float = 10.0) -> list:
        """Receive one frame and return the session events it produced."""
        import asyncio

        data = await asyncio.wait_for(self.ws.recv(), timeout)
        self.session.receive(data)
        return self.session.events_received()

    async def call(self, op, body: dict, timeout: float = 10.0):
        """Send a request; return the ResponseReceived/ErrorReceived event for it
        (requests from home arriving meanwhile are kept in ``self.inbox``)."""
        sent = self.session.request(op, body)
        await self.flush()
        while True:
            for ev in await self.next_events(timeout):
                if getattr(ev, "request", None) is not None and ev.request.id == sent.id:
                    return ev
                self.inbox.append(ev)

    async def hello(self, image_id: str, instance_id: str | None = None,
                    fingerprint: str = "machine-1", **extra):
        body = {"agent_version": "test", "image_id": image_id, "instance_id": instance_id,
                "machine": {"fingerprint": fingerprint, "platform": "qemu-kvm"},
                "selfcheck": {"verdict": "ok", "measured": {"vcpu": 4}, "shortfalls": []},
                "listening": [], "socket_index": 0, "config_version": None, **extra}
        return await self.call(self.p.Op.HELLO, body)

    async def send_raw(self, data) -> None:
        await self.ws.send(data)

    def forge(self, op, body: dict, kind: str = "request", *, re: str | None = None,
              seq: int | None = None, ts: float | None = None) -> str:
        """A frame our own Session would refuse to send (oversized fields, say):
        a fresh id and timestamp, the rest as given. Returns the JSON text."""
        import json as _json
        import time as _time

        return _json.dumps({"v": 1, "id": self.p.new_id(), "kind": kind,
                            "op": getattr(op, "value", op), "re": re, "seq": seq,
                            "ts": _time.time() if ts is None else ts, "body": body})

    async def send_forged(self, op, body: dict, kind: str = "request", **envelope):
        """Send a forged frame and return the next frame home sends back, decoded."""
        await self.ws.send(self.forge(op, body, kind, **envelope))
        return await self.recv_message()

    async def recv_message(self, timeout: float = 10.0):
        """The next raw frame, decoded (without session bookkeeping)."""
        import asyncio

        return self.p.decode(await asyncio.wait_for(self.ws.recv(), timeout))

    async def close(self) -> None:
        await self.ws.close()


async def enroll(home: HomeProcess, bundle: dict, tmp: Path, fingerprint: str = "machine-1",
                 key=None, proof_key=None):
    """Enroll like an agent would; returns (instance_id, cert_pem, key_pem, sealing_key)
    or the ErrorReceived event when home refuses.

    ``key``: the instance key (new by default); ``proof_key``: sign the request's
    proof with it (the instance's current key, when re-enrolling an enrolled machine).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from tether import protocol as p
    from tether import sealing

    from tether import enrolproof

    key = key or ec.generate_private_key(ec.SECP256R1())
    seal_key = sealing.generate_private_key()
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "instance")]))
           .sign(key, hashes.SHA256())).public_bytes(serialization.Encoding.PEM).decode()
    body = {"csr_pem": csr, "sealing_public_key": sealing.public_key_text(seal_key),
            "machine": {"fingerprint": fingerprint}}
    if proof_key is not None:
        body["proof"] = enrolproof.sign(proof_key, image_id=bundle["image_id"],
                                        fingerprint=fingerprint, csr_pem=csr,
                                        sealing_public_key=body["sealing_public_key"])
    agent = await RawAgent.connect(home.url, client_context(bundle["ca_pem"], bundle["cert_pem"],
                                                             bundle["key_pem"], tmp))
    try:
        hello = await agent.hello(bundle["image_id"], fingerprint=fingerprint)
        assert isinstance(hello, p.ResponseReceived), hello
        ev = await agent.call(p.Op.ENROLL, body)
    finally:
        await agent.close()
    if isinstance(ev, p.ErrorReceived):
        return ev
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return ev.message.body["instance_id"], ev.message.body["cert_pem"], key_pem, seal_key
