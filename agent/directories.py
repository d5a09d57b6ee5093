"""The directory engine as the running agent sees it: loaded only once it is needed.

Why loaded late: the engine (:mod:`tether.agent.directory`, and ldap3 with it) is
most of the agent's code and memory, and an agent whose configuration names no
directory never needs it. Until then sync/search/authenticate/provision are
answered ``unavailable``, so home routes them to a connector that has one.

Contract of the engine's :class:`tether.agent.directory.bridge.Bridge`:
``Bridge(state_dir, sockets)``; ``configure(config: dict)`` with the unsealed
configuration at start and after every applied push; ``async handle(link,
message) -> dict`` serves the directory operations (raise
:class:`tether.agent.link.HandlerError` for an error reply); ``flow()`` and
``status()`` for heartbeats and status; ``async close()`` when the agent stops.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from tether import protocol as p

from .link import HandlerError
from .sockets import Sockets

if TYPE_CHECKING:
    from .link import Link

log = logging.getLogger("tether.agent")

#: Where the directory engine plugs in (an optional module: an agent built without it
#: answers the directory operations ``unavailable``).
DIRECTORY_BRIDGE = "tether.agent.directory.bridge"
DIRECTORY_OPS = frozenset({p.Op.SYNC, p.Op.SEARCH, p.Op.AUTHENTICATE, p.Op.PROVISION})


class Directories:
    """The directory engine of one agent, or None of it while no directory is configured."""

    def __init__(self, state_dir: Path, sockets: Sockets) -> None:
        self.state_dir = state_dir
        self.sockets = sockets
        self.engine = None  # the Bridge, once a configuration named a directory

    def configure(self, config: dict | None) -> None:
        """Hand the (unsealed, in-memory) configuration to the engine, loading it if needed."""
        if (not config or not config.get("directories")) and self.engine is None:
            return  # an engine already running still hears that its directories are gone
        try:
            if self.engine is None:
                self.engine = load_bridge(self.state_dir, self.sockets)
            if self.engine is not None:
                self.engine.configure(config or {})
        except Exception:  # noqa: BLE001 - a bad directory must not stop the channel
            log.exception("directory engine refused the configuration")

    async def handle(self, link: Link, message: p.Message) -> dict:
        """Serve a directory operation, or say why this agent cannot."""
        if self.engine is not None:
            return await self.engine.handle(link, message)
        raise HandlerError(p.ErrorCode.UNAVAILABLE,
                           f"{message.op.value}: no directory is configured on this agent yet")

    def flow(self) -> dict | None:
        """The heartbeat's per-directory flow (issue 12), None without an engine."""
        return self.engine.flow() if self.engine is not None else None

    def status(self) -> dict | None:
        return self.engine.status() if self.engine is not None else None

    async def close(self) -> None:
        """Agent stopping: followers stop; spools stay for the next start."""
        if self.engine is not None:
            await self.engine.close()


def load_bridge(state_dir: Path, sockets: Sockets):
    """``tether.agent.directory.bridge.Bridge(state_dir, sockets)`` when that module exists."""
    # look for the file, not find_spec: that would import the directory package
    if not (Path(__file__).parent / "directory" / "bridge.py").exists():
        return None
    return importlib.import_module(DIRECTORY_BRIDGE).Bridge(state_dir, sockets)

