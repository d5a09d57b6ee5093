"""``tether-agent run``: the appliance's long-running service, wired from small parts.

Start-up order: instance keys (made on first boot), machine fingerprint, last
good configuration, local self-check, READY=1 to systemd (the agent is useful
from its last good configuration even while home is away), then enrollment
with the image certificate if there is no valid instance certificate, then the
socket slots, each dialling home with the instance certificate and rotating at
its time-to-live. Background: heartbeats, periodic self-check, certificate
renewal, systemd watchdog.

:class:`Agent` is only the composition root: it makes the parts, hands each
what it needs (no part holds the agent) and runs them.

=================  ==========================================================
part               what it is
=================  ==========================================================
``sockets``        :class:`~tether.agent.sockets.Sockets`, the live links home
``health``         :class:`~tether.agent.health.Health`, the self-check
``config``         :class:`~tether.agent.configapply.ConfigApplier` over the
                   :class:`~tether.agent.config.ConfigStore`
``enrollment``     :class:`~tether.agent.enrollment.Enrollment`: id, certificate
``directories``    :class:`~tether.agent.directories.Directories`: the engine
``updater``        :class:`~tether.agent.updater.Updater`: whole-image updates
``reports``        :class:`~tether.agent.reports.Reports`: hello/heartbeat/status
``dialer``         :class:`~tether.agent.homedialer.HomeDialer`
slots              :class:`~tether.agent.slots.Slot`, one per socket
=================  ==========================================================
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from tether import __version__
from tether import protocol as p

from . import instancekeys, machine, updater
from .config import ConfigStore
from .configapply import ConfigApplier
from .directories import DIRECTORY_OPS, Directories
from .enrollment import Enrollment, sleep_or_stop
from .health import Health
from .homedialer import HomeDialer
from .link import HandlerError, Link
from .reports import Reports
from .sdnotify import SystemdNotifier, watchdog_interval_s
from .settings import Settings
from .slots import Slot, SlotContext
from .sockets import Sockets

log = logging.getLogger("tether.agent")


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


class Agent:
    """One agent process: makes the parts, wires them, runs them until SIGTERM."""

    def __init__(self, settings: Settings, options: RunOptions | None = None,
                 notifier: SystemdNotifier | None = None) -> None:
        self.settings = settings
        self.options = options or RunOptions()
        self.notifier = notifier or SystemdNotifier()
        self.state = settings.state_dir
        self.started = time.monotonic()
        self.stopping = asyncio.Event()
        self.sockets = Sockets()
        self.health = Health(self.state, self.options.dmi_dir, settings.home_urls[0],
                             settings.firstboot_path)
        self._tasks: list[asyncio.Task] = []
        # a slot's health for updates: the self-check ran (degraded resources are the
        # host's doing, the same in either slot, so they never roll a slot back)
        self.updater = updater.Updater(self.state, self.sockets.links,
                                       rauc=self.options.rauc, cmdline=self.options.cmdline,
                                       version_file=self.options.image_version_file,
                                       selfcheck_ok=lambda: self.health.report is not None)

    def prepare(self) -> None:
        """Everything local (keys, machine identity, last good config, self-check), then wiring."""
        self.state.mkdir(mode=0o700, parents=True, exist_ok=True)
        keys, created = instancekeys.load_or_create_keys(self.state)
        if created:
            log.info("first boot: generated the instance keys",
                     extra={"tether_key_fingerprint": keys.signing_fingerprint()})
        self.machine = machine.identify(self.options.dmi_dir)
        store = ConfigStore(self.state, self.settings.connector, keys.sealing)
        self.enrollment = Enrollment(self.state, self.settings, keys, self.machine, store,
                                     stopping=self.stopping, status=self.notifier.status,
                                     renew_min_interval_s=self.options.renew_min_interval_s)
        store.load_last_good()
        self.directories = Directories(self.state, self.sockets)
        self.config = ConfigApplier(store, self.settings, sockets=self.options.sockets,
                                    ttl_s=self.options.ttl_s,
                                    changed=self.configure_directories,
                                    applied=self.notify_status)
        self.configure_directories()
        self.health.measure()
        self.reports = Reports(self.settings, self.machine, enrollment=self.enrollment,
                               health=self.health, store=store, updater=self.updater,
                               sockets=self.sockets, directories=self.directories,
                               proxy=self.config.proxy, started=self.started)
        self.dialer = HomeDialer(self.settings, self.state, proxy=self.config.proxy,
                                 handler=self.handle, hello_body=self.reports.hello_body,
                                 on_failure=self.health.dial_failed, on_hello=self.after_hello,
                                 stopping=self.stopping)
        self.ensure_enrolled = functools.partial(self.enrollment.ensure_enrolled,
                                                 self.dialer.open_image_socket)

    def configure_directories(self) -> None:
        """Hand the (unsealed, in-memory) configuration to the directory engine."""
        self.directories.configure(self.config.store.secrets_open)

    def after_hello(self, link: Link) -> None:
        """Learn from home's hello response: its clock, config key, whether we may commit."""
        body = link.hello_response.body
        self.health.home_answered(link, via_proxy=self.config.proxy() is not None)
        if body.get("role") == "instance":  # home accepted this instance: a trial boot may commit
            self.spawn(self.updater.after_boot(True))
        self.config.learn_verify_key(body.get("config_key_pem"))

    async def on_connected(self, link: Link) -> None:
        """A slot's socket is up: tell home which configuration runs, update the status line."""
        await self.config.send_ack(link)
        self.notify_status()

    async def handle(self, link: Link, message: p.Message) -> dict:
        """Serve one request from home: each operation goes to the part that owns it."""
        if message.op is p.Op.CONFIG_PUSH:
            return await self.config.on_push(link, message)
        if message.op is p.Op.STATUS:
            return self.reports.status()
        if message.op is p.Op.UPDATE:
            return self.updater.on_offer(message.body)
        if message.op in DIRECTORY_OPS:
            return await self.directories.handle(link, message)
        raise HandlerError(p.ErrorCode.UNAVAILABLE,
                           f"{message.op.value} is not supported by agent {__version__}")

    # ------------------------------------------------------------------ background

    def notify_status(self) -> None:
        self.notifier.status(f"{self.sockets.up()}/{self.config.sockets()} sockets to home; "
                             f"config v{self.config.store.version}; "
                             f"self-check {self.health.report.verdict}")

    async def selfcheck_loop(self) -> None:
        while not await sleep_or_stop(self.stopping, self.options.selfcheck_interval_s):
            self.health.measure()  # ~1 ms of psutil reads: no worker thread needed

    async def watchdog_loop(self, interval: float) -> None:
        while not await sleep_or_stop(self.stopping, interval):
            self.notifier.watchdog()

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)
        return task

    def slot_context(self) -> SlotContext:
        return SlotContext(home_urls=list(self.settings.home_urls), dialer=self.dialer,
                           identity_ready=self.ensure_enrolled, sockets=self.sockets,
                           ttl=self.config.ttl, drain_quiet_s=self.options.drain_quiet_s,
                           heartbeat_body=self.reports.heartbeat_body,
                           on_connected=self.on_connected, spawn=self.spawn,
                           stopping=self.stopping)

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the exit status."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        self.prepare()
        self.notifier.ready(f"started; config v{self.config.store.version}; "
                            f"self-check {self.health.report.verdict}")
        interval = watchdog_interval_s()
        if interval:
            self.spawn(self.watchdog_loop(interval))
        self.spawn(self.selfcheck_loop())
        self.spawn(self.updater.after_boot(False))  # a normal boot marks its slot good now
        if await self.ensure_enrolled():
            context = self.slot_context()
            slots = [self.spawn(Slot(context, i).run()) for i in range(self.config.sockets())]
            self.spawn(self.enrollment.renewal_loop(self.sockets, self.dialer.open_image_socket))
            await self.stopping.wait()
            await asyncio.wait(slots, timeout=10)
        self.notifier.stopping()
        await self.directories.close()  # followers stop; spools stay for the next start
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        log.info("agent stopped")
        return 0
