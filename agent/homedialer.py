"""Open one socket home with the right credential and learn from its hello.

Both the slots (instance certificate) and enrollment (image credential) open
sockets the same way: :func:`tether.agent.dialer.dial` with failover and
backoff, the agent's request handler, the hello body, the dial failures told to
the self-check, and home's hello response handed to ``on_hello``. This part
holds exactly those, so neither the slots nor enrollment need the agent.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tether import __version__

from . import instancekeys, tlsctx
from .channel import DialPlan
from .dialer import DialOptions, dial
from .settings import Settings

if TYPE_CHECKING:
    from .link import Handler, Link


class HomeDialer:
    """Dials home for one agent; ``open`` returns an established (link, reader) or None."""

    def __init__(self, settings: Settings, state_dir: Path, *, proxy: Callable[[], str | None],
                 handler: Handler, hello_body: Callable[[Link], dict],
                 on_failure: Callable[[str, BaseException], None],
                 on_hello: Callable[[Link], None], stopping: asyncio.Event) -> None:
        self.settings = settings
        self.state_dir = state_dir
        self.proxy = proxy
        self.handler = handler
        self.hello_body = hello_body
        self.on_failure = on_failure
        self.on_hello = on_hello
        self.stopping = stopping

    def instance_ssl(self) -> ssl.SSLContext:
        return tlsctx.client_context(self.settings.ca_cert, instancekeys.cert_path(self.state_dir),
                                     instancekeys.key_path(self.state_dir))

    def image_ssl(self) -> ssl.SSLContext:
        return tlsctx.client_context(self.settings.ca_cert, self.settings.image_cert,
                                     self.settings.image_key)

    def options(self, ssl_factory: Callable[[], ssl.SSLContext]) -> DialOptions:
        return DialOptions(ssl_context=ssl_factory, proxy=self.proxy,
                           user_agent=f"tether-agent/{__version__}",
                           ping_interval_s=self.settings.ping_interval_s,
                           ping_timeout_s=self.settings.ping_timeout_s)

    async def open(self, plan: DialPlan, index: int,
                   options: DialOptions) -> tuple[Link, asyncio.Task] | None:
        """Dial slot ``index`` along ``plan`` until hello is accepted (None once stopping)."""
        got = await dial(plan, index, options, self.handler, self.hello_body, self.stopping,
                         self.on_failure)
        if got is not None:
            self.on_hello(got[0])
        return got

    async def open_image_socket(self, plan: DialPlan) -> tuple[Link, asyncio.Task] | None:
        """A socket for enrollment, with the image credential."""
        return await self.open(plan, 0, self.options(self.image_ssl))
