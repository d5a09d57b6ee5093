"""``tether-agent run``: the appliance's long-running service.

Start-up order: instance keys (made on first boot), machine fingerprint, last
good configuration, local self-check, READY=1 to systemd (the agent is useful
from its last good configuration even while home is away), then enrollment
with the image certificate if there is no valid instance certificate, then the
socket slots, each dialling home with the instance certificate and rotating at
its time-to-live. Background: heartbeats, periodic self-check, certificate
renewal, systemd watchdog.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib
import json
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from cryptography import x509

from tether import __version__, configsig
from tether import protocol as p

from . import instancekeys, machine, netfacts, selfcheck, tlsctx, updater
from .atomicfile import write_atomic
from .backoff import Backoff
from .channel import DialPlan
from .config import ConfigStore
from .dialer import DialOptions, dial
from .link import HandlerError, Link, RequestFailed
from .listening import listening_sockets
from .probes import host_port
from .sdnotify import SystemdNotifier, watchdog_interval_s
from .settings import Settings
from .slots import Slot

log = logging.getLogger("tether.agent")

INSTANCE_FILE = "instance.json"
#: Where the directory engine plugs in (optional module, see load_directory_bridge).
DIRECTORY_BRIDGE = "tether.agent.directory.bridge"
DIRECTORY_OPS = frozenset({p.Op.SYNC, p.Op.SEARCH, p.Op.AUTHENTICATE, p.Op.PROVISION})


@dataclass
class RunOptions:
    """Knobs of ``tether-agent run`` beyond the settings files (tests use them)."""

    dmi_dir: Path = machine.DMI_DIR
    sockets: int | None = None
    ttl_s: float | None = None
    selfcheck_interval_s: float = 300.0
    drain_quiet_s: float = 2.0
    #: Floor between two renewals, so a certificate that is due at once (home's
    #: back-dating, a skewed clock) cannot make the agent hammer home.
    renew_min_interval_s: float = 60.0
    #: Whole-image updates (issue 14): the rauc command, where the booted slot and
    #: the slot's image version are read (tests point them at their own files).
    rauc: str = "rauc"
    cmdline: Path = updater.CMDLINE
    image_version_file: Path = updater.VERSION_FILE


async def sleep_or_stop(event: asyncio.Event, timeout: float) -> bool:
    """Sleep ``timeout`` seconds or until ``event`` is set; True when it was set."""
    try:
        await asyncio.wait_for(event.wait(), max(0.0, timeout))
        return True
    except asyncio.TimeoutError:
        return False


class Agent:
    """One agent process: identity, configuration and its socket slots."""

    def __init__(self, settings: Settings, options: RunOptions | None = None,
                 notifier: SystemdNotifier | None = None) -> None:
        self.settings = settings
        self.local_address: str | None = None  # our end of the socket home: reported address
        self.options = options or RunOptions()
        self.notifier = notifier or SystemdNotifier()
        self.state = settings.state_dir
        self.started = time.monotonic()
        self.stopping = asyncio.Event()
        self.links: dict[int, Link] = {}
        self.draining: set[Link] = set()
        self.instance_id: str | None = None
        self.enroll_error: str | None = None
        self.home_probe = selfcheck.HomeProbe(host=host_port(settings.home_urls[0])[0])
        self._tasks: list[asyncio.Task] = []
        # a slot's health for updates: the self-check ran (degraded resources are the
        # host's doing, the same in either slot, so they never roll a slot back)
        self.updater = updater.Updater(self.state, lambda: list(self.links.values()),
                                       rauc=self.options.rauc, cmdline=self.options.cmdline,
                                       version_file=self.options.image_version_file,
                                       selfcheck_ok=lambda: getattr(self, "report", None) is not None)

    # ------------------------------------------------------------------ start-up

    def prepare(self) -> None:
        """Everything local: keys, machine identity, last good config, self-check."""
        self.state.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.keys, created = instancekeys.load_or_create_keys(self.state)
        if created:
            log.info("first boot: generated the instance keys",
                     extra={"tether_key_fingerprint": self.keys.signing_fingerprint()})
        self.machine = machine.identify(self.options.dmi_dir)
        self.instance_id = self._load_instance().get("instance_id")
        self.config = ConfigStore(self.state, self.settings.connector, self.keys.sealing)
        self.config.instance_id = self.instance_id
        self.config.load_last_good()
        self.directories = None
        self.configure_directories()
        self.run_selfcheck()

    def configure_directories(self) -> None:
        """Hand the (unsealed, in-memory) configuration to the directory engine.

        The engine (and ldap3 with it) is loaded only once a configuration names
        directories, so an agent without any keeps a small footprint.
        """
        config = self.config.secrets_open
        if (not config or not config.get("directories")) and self.directories is None:
            return  # an engine already running still hears that its directories are gone
        try:
            if self.directories is None:
                self.directories = load_directory_bridge(self)
            if self.directories is not None:
                self.directories.configure(config or {})
        except Exception:  # noqa: BLE001 - a bad directory must not stop the channel
            log.exception("directory engine refused the configuration")

    def _load_instance(self) -> dict:
        path = self.state / INSTANCE_FILE
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def run_selfcheck(self) -> selfcheck.Report:
        measured = selfcheck.measure_host(self.state, self.options.dmi_dir, self.home_probe)
        self.report = selfcheck.evaluate(measured)
        if self.report.shortfalls:
            log.warning("self-check: degraded: %s",
                        "; ".join(s.message for s in self.report.shortfalls),
                        extra={"tether_verdict": self.report.verdict})
        return self.report

    # ------------------------------------------------------------------ TLS / proxy

    def instance_ssl(self):
        return tlsctx.client_context(self.settings.ca_cert, instancekeys.cert_path(self.state),
                                     instancekeys.key_path(self.state))

    def image_ssl(self):
        return tlsctx.client_context(self.settings.ca_cert, self.settings.image_cert,
                                     self.settings.image_key)

    def proxy(self) -> str | None:
        """The configuration's proxy if home set one, else the first-boot/image one."""
        section = self.config.channel_overrides()
        proxy = section.get("proxy", self.settings.proxy) or None
        password = section.get("proxy_password")
        if proxy and password:
            parts = urlsplit(proxy)
            if parts.username and not parts.password:
                netloc = f"{parts.username}:{quote(password, safe='')}@{parts.hostname}"
                netloc += f":{parts.port}" if parts.port else ""
                proxy = urlunsplit(parts._replace(netloc=netloc))
        return proxy

    def dial_options(self, ssl_factory) -> DialOptions:
        return DialOptions(ssl_context=ssl_factory, proxy=self.proxy,
                           user_agent=f"tether-agent/{__version__}",
                           ping_interval_s=self.settings.ping_interval_s,
                           ping_timeout_s=self.settings.ping_timeout_s)

    # ------------------------------------------------------------------ hello

    def selfcheck_body(self) -> dict:
        """The self-check report plus the network facts (addresses, refused first-boot values)."""
        body = self.report.as_dict()
        body["network"] = netfacts.describe(self.settings.firstboot_path, self.local_address)
        return body

    def hello_body(self, link: Link) -> dict:
        # this socket is open (TCP, TLS, WebSocket done): home is reachable
        self.home_probe.reachable, self.home_probe.error = True, ""
        if self.home_probe.dns_ok is False:
            self.home_probe.dns_ok = None if self.proxy() else True
        self.report = selfcheck.evaluate(self.report.measured)
        local = link.ws.local_address
        self.local_address = str(local[0]) if local else None
        return {
            "agent_version": __version__,
            "image_id": self.settings.image_id,
            "instance_id": self.instance_id,
            "machine": self.machine.as_dict(),
            "selfcheck": self.selfcheck_body(),
            "listening": listening_sockets(),
            "socket_index": link.index,
            "config_version": self.config.version,
            "image_version": self.updater.version,
            "boot_slot": self.updater.booted,
        }

    def note_failure(self, url: str, exc: BaseException) -> None:
        """A failed dial says something about reaching home: keep it for self-check."""
        self.home_probe.reachable = False
        self.home_probe.error = f"{type(exc).__name__}: {exc}"[:300]
        if isinstance(exc, socket.gaierror):
            self.home_probe.dns_ok = False
        self.report = selfcheck.evaluate(self.report.measured)  # verdict follows the probe

    def after_hello(self, link: Link) -> None:
        """Learn from home's hello response: its clock, config key, config version."""
        body = link.hello_response.body
        midpoint = link.hello_sent_at + link.hello_rtt / 2
        probe = self.home_probe
        probe.host = host_port(link.url)[0]
        probe.reachable, probe.error = True, ""
        probe.dns_ok = True if self.proxy() is None else None
        probe.clock_skew_s = round(float(body["server_time"]) - midpoint, 3)
        self.report = selfcheck.evaluate(self.report.measured)  # verdict follows the probe
        if body.get("role") == "instance":  # home accepted this instance: a trial boot may commit
            self.spawn(self.updater.after_boot(True))
        if isinstance(body.get("config_key_pem"), str):
            try:
                if self.config.set_verify_key(body["config_key_pem"]):
                    self.configure_directories()  # what that document configured is gone
            except configsig.ConfigError as exc:
                log.error("home sent an unusable config key: %s", exc)

    # ------------------------------------------------------------------ enrollment

    def has_identity(self) -> bool:
        cert = instancekeys.load_cert(self.state)
        return bool(cert and self.instance_id and not instancekeys.is_expired(cert))

    async def ensure_enrolled(self) -> bool:
        """Enroll with the image certificate unless a valid instance cert exists."""
        if self.has_identity():
            return True
        plan = DialPlan(list(self.settings.home_urls), Backoff())
        options = self.dial_options(self.image_ssl)
        self.notifier.status("enrolling with home")
        while not self.stopping.is_set():
            got = await dial(plan, 0, options, self.handle, self.hello_body, self.stopping,
                             self.note_failure)
            if got is None:
                return False
            link, reader = got
            self.after_hello(link)
            try:
                response = await link.request(p.Op.ENROLL, instancekeys.enroll_body(
                    self.keys, self.settings.image_id, self.machine.as_dict(),
                    time.time() + link.session.clock_offset))
                self.store_issued(response.body)
                self.enroll_error = None
                log.info("enrolled as instance %s", self.instance_id,
                         extra={"tether_instance": self.instance_id})
                return True
            except (RequestFailed, instancekeys.InstanceKeyError, ConnectionError,
                    asyncio.TimeoutError) as exc:
                self.enroll_error = getattr(exc, "code", type(exc).__name__)
                delay = plan.backoff.next_delay()
                log.error("enrollment failed: %s; retrying in %.0f s", exc, delay,
                          extra={"tether_error": self.enroll_error})
                self.notifier.status(f"enrollment refused by home: {self.enroll_error}")
            finally:
                await link.close("enrollment done")
                reader.cancel()
            if await sleep_or_stop(self.stopping, delay):
                return False
        return False

    def store_issued(self, body: dict) -> x509.Certificate:
        """Check and keep the instance certificate from an enroll/renew response."""
        cert = instancekeys.check_issued_cert(body["cert_pem"], self.keys,
                                          self.settings.ca_cert.read_bytes())
        instancekeys.store_cert(self.state, cert)
        self.instance_id = body["instance_id"]
        self.config.instance_id = self.instance_id
        write_atomic(self.state / INSTANCE_FILE, json.dumps({
            "instance_id": self.instance_id, "image_id": self.settings.image_id,
            "not_after": body.get("not_after"), "cert_serial": format(cert.serial_number, "x"),
        }).encode(), mode=0o600)
        if isinstance(body.get("config_key_pem"), str):
            self.config.set_verify_key(body["config_key_pem"])
        return cert

    async def renewal_loop(self) -> None:
        """Renew the instance certificate after 2/3 of its life, over a live socket."""
        last_attempt = -float("inf")
        while not self.stopping.is_set():
            cert = instancekeys.load_cert(self.state)
            if cert is None or instancekeys.is_expired(cert):
                await self.ensure_enrolled()
                continue
            due_in = max((instancekeys.renew_at(cert) - _utcnow()).total_seconds(),
                         last_attempt + self.options.renew_min_interval_s - time.monotonic())
            if due_in > 0:
                await sleep_or_stop(self.stopping, min(due_in, 300))
                continue
            link = next((ln for ln in self.links.values() if not ln.draining), None)
            if link is None:
                await sleep_or_stop(self.stopping, 5)
                continue
            last_attempt = time.monotonic()
            try:
                response = await link.request(p.Op.RENEW, {
                    "csr_pem": instancekeys.make_csr(self.keys, self.instance_id or "instance")})
                cert = self.store_issued(response.body)
                log.info("instance certificate renewed; valid until %s",
                         cert.not_valid_after_utc.isoformat(),
                         extra={"tether_cert_serial": format(cert.serial_number, "x")})
            except Exception as exc:  # noqa: BLE001 - retry later, the old cert still works
                log.warning("certificate renewal failed: %s; retrying later", exc)

    # ------------------------------------------------------------------ slots

    def sockets(self) -> int:
        wanted = self.options.sockets or self.config.channel_overrides().get("sockets") \
            or self.settings.sockets
        return max(1, min(int(wanted), 8))

    def ttl(self) -> float:
        return float(self.options.ttl_s or self.config.channel_overrides().get("socket_ttl_s")
                     or self.settings.ttl_s)

    def heartbeat_body(self) -> dict:
        body = {"uptime": round(time.monotonic() - self.started, 3),
                "listening": listening_sockets(), "config_version": self.config.version,
                "selfcheck": self.selfcheck_body()}
        if self.directories is not None:
            body["directories"] = self.directories.flow()  # stalls show at home (issue 12)
        return body

    async def send_config_ack(self, link: Link, error: configsig.ConfigError | None = None) -> None:
        """Tell home which configuration runs (after hello and after every push)."""
        body: dict = {"version": self.config.version,
                      "status": "rejected" if error else
                      ("applied" if self.config.version is not None else "last_good")}
        if error is not None:
            body.update(error=error.code, detail=str(error)[:500])
        try:
            await link.event(p.Op.CONFIG_ACK, body)
        except Exception:  # noqa: BLE001
            pass

    # ------------------------------------------------------------------ requests

    async def handle(self, link: Link, message: p.Message) -> dict:
        """Serve one request from home."""
        if message.op is p.Op.CONFIG_PUSH:
            return await self.on_config_push(link, message)
        if message.op is p.Op.STATUS:
            return self.status()
        if message.op is p.Op.UPDATE:
            return self.updater.on_offer(message.body)
        if message.op in DIRECTORY_OPS and self.directories is not None:
            return await self.directories.handle(link, message)
        if message.op in DIRECTORY_OPS:
            raise HandlerError(p.ErrorCode.UNAVAILABLE,
                               f"{message.op.value}: no directory is configured on this "
                               "agent yet")
        raise HandlerError(p.ErrorCode.UNAVAILABLE,
                           f"{message.op.value} is not supported by agent {__version__}")

    async def on_config_push(self, link: Link, message: p.Message) -> dict:
        replace = message.body.get("replace") is True
        if replace:
            log.warning("home replaces configuration v%s: %s", self.config.version,
                        str(message.body.get("reason") or "no reason given")[:300])
        try:
            applied = self.config.apply(message.body["config"], replace=replace)
        except configsig.ConfigError as exc:
            log.error("configuration refused: %s", exc, extra={"tether_error": exc.code})
            await self.send_config_ack(link, exc)
            raise HandlerError(exc.code, str(exc)) from None
        if applied.changed:
            log.info("configuration v%d applied", applied.version,
                     extra={"tether_config_version": applied.version})
            self.configure_directories()
        await self.send_config_ack(link)
        self.notify_status()
        return {"version": applied.version, "applied": True}

    def status(self) -> dict:
        now = time.monotonic()
        return {
            "agent_version": __version__,
            "image_id": self.settings.image_id,
            "instance_id": self.instance_id,
            "uptime": round(now - self.started, 3),
            "machine": self.machine.as_dict(),
            "selfcheck": self.selfcheck_body(),
            "listening": listening_sockets(),
            "config_version": self.config.version,
            "config_error": str(self.config.last_error) if self.config.last_error else None,
            "sockets": [{"index": ln.index, "url": ln.url, "age_s": round(now - ln.opened_at, 3),
                         "served": ln.served, "in_flight": ln.in_flight,
                         "draining": ln.draining}
                        for ln in [*self.links.values(), *self.draining]],
            "pid": os.getpid(),
            "directories": self.directories.status() if self.directories is not None else None,
            "update": self.updater.status(),
        }

    # ------------------------------------------------------------------ background

    def notify_status(self) -> None:
        live = sum(1 for ln in self.links.values() if not ln.draining)
        self.notifier.status(f"{live}/{self.sockets()} sockets to home; config "
                             f"v{self.config.version}; self-check {self.report.verdict}")

    async def selfcheck_loop(self) -> None:
        while not await sleep_or_stop(self.stopping, self.options.selfcheck_interval_s):
            self.run_selfcheck()  # ~1 ms of psutil reads: no worker thread needed

    async def watchdog_loop(self, interval: float) -> None:
        while not await sleep_or_stop(self.stopping, interval):
            self.notifier.watchdog()

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)
        return task

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the exit status."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        self.prepare()
        self.notifier.ready(f"started; config v{self.config.version}; "
                            f"self-check {self.report.verdict}")
        interval = watchdog_interval_s()
        if interval:
            self.spawn(self.watchdog_loop(interval))
        self.spawn(self.selfcheck_loop())
        self.spawn(self.updater.after_boot(False))  # a normal boot marks its slot good now
        if await self.ensure_enrolled():
            slots = [self.spawn(Slot(self, i).run()) for i in range(self.sockets())]
            self.spawn(self.renewal_loop())
            await self.stopping.wait()
            await asyncio.wait(slots, timeout=10)
        self.notifier.stopping()
        if self.directories is not None:
            await self.directories.close()  # followers stop; spools stay for the next start
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        log.info("agent stopped")
        return 0


def load_directory_bridge(agent: "Agent"):
    """``tether.agent.directory.bridge.Bridge(agent)`` when that module exists.

    Contract for the directory engine: ``configure(config: dict)`` is called with
    the unsealed configuration at start and after every applied push;
    ``async handle(link, message) -> dict`` serves sync/search/authenticate/
    provision (stream chunks with ``link.session.chunk`` + ``link.flush``; raise
    ``tether.agent.link.HandlerError`` for an error reply). Without the module
    those operations are answered ``unavailable``.
    """
    # look for the file, not find_spec: that would import the directory package
    if not (Path(__file__).parent / "directory" / "bridge.py").exists():
        return None
    return importlib.import_module(DIRECTORY_BRIDGE).Bridge(agent)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)
