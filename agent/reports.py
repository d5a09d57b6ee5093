"""What the agent tells home about itself: the hello, heartbeat and status bodies.

Why one part for the three: they describe the same things (version, identity,
self-check, listening sockets, configuration, update state, directories) at
different depths, and each reads the parts that know them instead of the agent.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from tether import __version__

from .config import ConfigStore
from .directories import Directories
from .enrollment import Enrollment
from .health import Health
from .listening import listening_sockets
from .machine import Machine
from .settings import Settings
from .sockets import Sockets
from .updater import Updater

if TYPE_CHECKING:
    from .link import Link


class Reports:
    """Builds the bodies from the parts that know their content."""

    def __init__(self, settings: Settings, machine: Machine, *, enrollment: Enrollment,
                 health: Health, store: ConfigStore, updater: Updater, sockets: Sockets,
                 directories: Directories, proxy: Callable[[], str | None],
                 started: float) -> None:
        self.settings = settings
        self.machine = machine
        self.enrollment = enrollment
        self.health = health
        self.store = store
        self.updater = updater
        self.sockets = sockets
        self.directories = directories
        self.proxy = proxy
        self.started = started

    def hello_body(self, link: Link) -> dict:
        # this socket is open (TCP, TLS, WebSocket done): home is reachable
        self.health.socket_opened(link, via_proxy=self.proxy() is not None)
        return {
            "agent_version": __version__,
            "image_id": self.settings.image_id,
            "instance_id": self.enrollment.instance_id,
            "machine": self.machine.as_dict(),
            "selfcheck": self.health.body(),
            "listening": listening_sockets(),
            "socket_index": link.index,
            "config_version": self.store.version,
            "image_version": self.updater.version,
            "boot_slot": self.updater.booted,
        }

    def heartbeat_body(self) -> dict:
        body = {"uptime": round(time.monotonic() - self.started, 3),
                "listening": listening_sockets(), "config_version": self.store.version,
                "selfcheck": self.health.body()}
        flow = self.directories.flow()
        if flow is not None:
            body["directories"] = flow  # stalls show at home (issue 12)
        return body

    def status(self) -> dict:
        now = time.monotonic()
        return {
            "agent_version": __version__,
            "image_id": self.settings.image_id,
            "instance_id": self.enrollment.instance_id,
            "uptime": round(now - self.started, 3),
            "machine": self.machine.as_dict(),
            "selfcheck": self.health.body(),
            "listening": listening_sockets(),
            "config_version": self.store.version,
            "config_error": str(self.store.last_error) if self.store.last_error else None,
            "sockets": self.sockets.describe(now),
            "pid": os.getpid(),
            "directories": self.directories.status(),
            "update": self.updater.status(),
        }
