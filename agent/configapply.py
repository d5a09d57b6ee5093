"""Home's configuration applied to the running agent: pushes, acks, channel settings.

:class:`tether.agent.config.ConfigStore` checks and keeps the signed document;
this part is what the running agent does with it: answer ``config.push``, tell
home which version runs (``config.ack`` after every hello and push), hand the
new document to whoever depends on it (the directory engine), and read the
channel settings home may override (proxy, sockets, socket TTL).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit, urlunsplit

from tether import configsig
from tether import protocol as p

from .config import ConfigStore
from .link import HandlerError
from .settings import Settings

if TYPE_CHECKING:
    from .link import Link

log = logging.getLogger("tether.agent")


class ConfigApplier:
    """The configuration store as the running agent uses it.

    ``changed()`` runs when the document's content changed (a push applied, or
    a new verification key dropped what the old one signed); ``applied()`` after
    every push (the systemd status line).
    """

    def __init__(self, store: ConfigStore, settings: Settings, *, sockets: int | None = None,
                 ttl_s: float | None = None, changed: Callable[[], None] = lambda: None,
                 applied: Callable[[], None] = lambda: None) -> None:
        self.store = store
        self.settings = settings
        self.sockets_override = sockets  # tether-agent run --sockets / --socket-ttl
        self.ttl_override = ttl_s
        self.changed = changed
        self.applied = applied

    # ---- channel settings

    def proxy(self) -> str | None:
        """The configuration's proxy if home set one, else the first-boot/image one."""
        section = self.store.channel_overrides()
        proxy = section.get("proxy", self.settings.proxy) or None
        password = section.get("proxy_password")
        if proxy and password:
            parts = urlsplit(proxy)
            if parts.username and not parts.password:
                netloc = f"{parts.username}:{quote(password, safe='')}@{parts.hostname}"
                netloc += f":{parts.port}" if parts.port else ""
                proxy = urlunsplit(parts._replace(netloc=netloc))
        return proxy

    def sockets(self) -> int:
        wanted = self.sockets_override or self.store.channel_overrides().get("sockets") \
            or self.settings.sockets
        return max(1, min(int(wanted), 8))

    def ttl(self) -> float:
        return float(self.ttl_override or self.store.channel_overrides().get("socket_ttl_s")
                     or self.settings.ttl_s)

    # ---- home's messages

    def learn_verify_key(self, pem) -> None:
        """Home's hello response names its configuration-verification key (it may rotate)."""
        if not isinstance(pem, str):
            return
        try:
            if self.store.set_verify_key(pem):
                self.changed()  # what that document configured is gone
        except configsig.ConfigError as exc:
            log.error("home sent an unusable config key: %s", exc)

    async def send_ack(self, link: Link, error: configsig.ConfigError | None = None) -> None:
        """Tell home which configuration runs (after hello and after every push)."""
        version = self.store.version
        body: dict = {"version": version,
                      "status": "rejected" if error else
                      ("applied" if version is not None else "last_good")}
        if error is not None:
            body.update(error=error.code, detail=str(error)[:500])
        try:
            await link.event(p.Op.CONFIG_ACK, body)
        except Exception:  # noqa: BLE001
            pass

    async def on_push(self, link: Link, message: p.Message) -> dict:
        """Serve ``config.push``: check and apply, ack, and answer."""
        replace = message.body.get("replace") is True
        if replace:
            log.warning("home replaces configuration v%s: %s", self.store.version,
                        str(message.body.get("reason") or "no reason given")[:300])
        try:
            applied = self.store.apply(message.body["config"], replace=replace)
        except configsig.ConfigError as exc:
            log.error("configuration refused: %s", exc, extra={"tether_error": exc.code})
            await self.send_ack(link, exc)
            raise HandlerError(exc.code, str(exc)) from None
        if applied.changed:
            log.info("configuration v%d applied", applied.version,
                     extra={"tether_config_version": applied.version})
            self.changed()
        await self.send_ack(link)
        self.applied()
        return {"version": applied.version, "applied": True}
